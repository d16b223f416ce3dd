"""Deep InfoMax pretraining. Importing the package registers its backbones with timm."""

from pipeline.models import backbones  # noqa: F401  (timm.create_model("dim_conv32"), "resnet18_cifar", ...)

#!/usr/bin/env python
"""Deep InfoMax pretraining: ``accelerate launch pretrain.py [--config FILE] [key=value ...]``.

Everything lives in ``pipeline.pretrain`` (also installed as the ``dim-pretrain`` command).
"""

from pipeline.pretrain import main

if __name__ == "__main__":
    main()

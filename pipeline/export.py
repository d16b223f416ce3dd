"""``dim-export``: copy or share a model folder; ``from pipeline.export import load_encoder``.

    dim-export RUN_OR_FOLDER --out DIR       # a copy of the model folder at DIR
    dim-export RUN_OR_FOLDER --push org/name # upload it to the Hugging Face Hub
    dim-export RUN_OR_FOLDER --push org/name --dry-run    # build what would be uploaded, list it

The upload is staged first (the export's files, the card's usage block naming the repo),
then checked (a token, the Hub reachable) before anything is created there, then sent
as one commit, so a failure leaves nothing half-done. timm's ``push_to_hf_hub`` is not
used as is: it re-serialises the backbone alone and writes its own card only where the
repo has none, so the DIM head and this card would not travel; the calls here are the
ones it makes (``create_repo``, then ``upload_folder``) on the staged folder.

``load_encoder`` is here too: model cards print ``from pipeline.export import
load_encoder``, and that stays the public way to load a whole DIM encoder.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import timm
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from pipeline.core.cli import one_line_mistakes
from pipeline.core.errors import ConfigError
from pipeline.core.files import (
    PICTURE,
    check_output_folder,
    human_bytes,
    new_partial,
    replace_folder,
)
from pipeline.share.card import set_block, set_front_matter, usage_block
from pipeline.share.export import (
    EXPORT_CARD,
    EXPORT_FILES,
    find_export,
    is_export,
    load_encoder,
    read_export_meta,
)

__all__ = ["PushError", "load_encoder", "main", "push", "stage"]


class PushError(RuntimeError):
    """No token, no network, or the Hub refused: nothing was uploaded."""


def _build(src: Path, dest: Path) -> None:
    """Write the model folder found at ``src`` into the empty folder ``dest``."""

    folder = find_export(src)
    for name in (*EXPORT_FILES, PICTURE):  # the card links the picture when there is one
        if (folder / name).is_file():
            shutil.copy2(folder / name, dest / name)


def _finish_card(dest: Path, ref: str, license: str | None, datasets: list[str] | None) -> None:

    path = dest / EXPORT_CARD
    if not path.is_file():
        return
    text = set_block(
        path.read_text(),
        "usage",
        usage_block(ref, read_export_meta(dest)["backbone"]),
        heading="How to use",
    )
    path.write_text(set_front_matter(text, license=license, datasets=datasets or None))


def stage(
    src: str | Path,
    dest: str | Path,
    *,
    repo_id: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
) -> list[Path]:
    """Build the model folder for ``src`` at ``dest``; returns its files, sorted.

    The card's usage block names ``hf-hub:repo_id`` when given, else ``dest``. An existing
    ``dest`` is replaced only if it is a model folder itself.
    """

    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not is_export(dest))):
        raise ConfigError(f"{dest} exists and is not a model folder; pick an empty or new --out")
    tmp = new_partial(dest)
    try:
        _build(Path(src), tmp)
        ref = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{dest.resolve()}"
        _finish_card(tmp, ref, license, datasets)
        replace_folder(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only there when building failed
    return sorted(p for p in dest.iterdir() if p.is_file())


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    message: str = "Add DIM encoder",
) -> str:
    """Upload ``folder`` to ``repo_id`` as one commit; returns the commit URL."""

    token = get_token()
    if not token:
        raise PushError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login`; nothing was uploaded"
        )
    api = HfApi(token=token, library_name="timm", library_version=timm.__version__)
    try:
        api.whoami()  # the token and the network, before anything is created remotely
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        raise PushError(
            f"the Hugging Face Hub refused the token ({status}); nothing was uploaded"
        ) from None
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise PushError(
            f"cannot reach the Hugging Face Hub ({type(err).__name__}: {first}); "
            f"nothing was uploaded"
        ) from None
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo.repo_id, folder_path=str(folder), revision=revision, commit_message=message
        )
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PushError(f"upload to {repo_id} failed: {first}") from None
    return commit.commit_url


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dim-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("source", help="a run output folder or a model folder")
    p.add_argument("--out", help="write the model folder here (kept after --dry-run too)")
    p.add_argument("--push", metavar="ORG/NAME", help="upload to this Hugging Face model repo")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="with --push: build exactly what would be uploaded and list it; send nothing",
    )
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default=None, help="branch to push to")
    p.add_argument("--license", default=None, help="the card's license id (e.g. mit, cc-by-4.0)")
    p.add_argument(
        "--dataset",
        action="append",
        default=None,
        help="a Hugging Face dataset id for the card (repeatable)",
    )
    return p


def check_args(args: argparse.Namespace) -> None:
    """Every mistake that can be known before the folder is built: what to do, the repo
    id, a token for a real upload, the source, and a writable --out."""
    if not args.out and not args.push:
        raise ConfigError("nothing to do: give --out DIR and/or --push ORG/NAME")
    if args.push:
        if args.push.count("/") != 1:
            raise ConfigError(f"--push expects ORG/NAME, got {args.push!r}")
        try:
            validate_repo_id(args.push)
        except HFValidationError as err:
            raise ConfigError(f"--push {args.push!r}: {str(err).splitlines()[0]}") from None
        if not args.dry_run and not get_token():
            raise ConfigError(
                "--push needs a Hugging Face token: set HF_TOKEN or run `hf auth login` "
                "(--dry-run builds and lists the upload without one)"
            )
    find_export(args.source)
    if args.out:
        check_output_folder(args.out, "--out", example="my-model")


@one_line_mistakes("dim-export")
def main(argv: list[str] | None = None) -> int:
    """Console entry point: a mistake is one stderr line and exit code 2, before anything
    is built; a refused upload is exit code 1."""
    args = build_parser().parse_args(argv)
    check_args(args)
    with tempfile.TemporaryDirectory(prefix="dim-export-") as scratch:
        dest = Path(args.out) if args.out else Path(scratch) / "model"
        files = stage(
            args.source, dest, repo_id=args.push, license=args.license, datasets=args.dataset
        )
        if not args.push:
            print(f"wrote {dest}: {', '.join(p.name for p in files)}")
            return 0
        head = (
            f"dry run: would upload {len(files)} files to "
            f"https://huggingface.co/{args.push} (nothing sent)"
            if args.dry_run
            else f"uploading {len(files)} files to https://huggingface.co/{args.push}"
        )
        print(head)
        for p in files:
            print(f"  {p.name:<24s} {human_bytes(p.stat().st_size):>9s}")
        if args.dry_run:
            return 0
        try:
            url = push(dest, args.push, private=args.private, revision=args.revision)
        except PushError as err:
            print(f"dim-export: error: {err}", file=sys.stderr)
            return 1
        print(f"pushed: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

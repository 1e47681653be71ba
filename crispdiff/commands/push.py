"""`crispdiff push DIR --repo_id owner/name`: write the model card and upload a pipeline folder to the Hugging Face Hub.

Training checkpoints (checkpoint-*), tensorboard logs and hidden staging files are not uploaded. The token comes from
--token, else HF_TOKEN or a cached `hf auth login`. If the upload cannot happen (no token, HF_HUB_OFFLINE=1, no
network, no permission) the command says so and exits with status 1; the local folder stays intact.
"""

from __future__ import annotations

import argparse

from crispdiff.core.errors import FlagError, report_user_error, run_entry_point
from crispdiff.publish.hub import HubUploadError, push_to_hub


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``push`` subcommand."""
    parser = subparsers.add_parser(
        "push",
        help="Upload a pipeline folder (with a fresh model card) to the Hugging Face Hub.",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("pipeline_dir", metavar="DIR", help="A pipeline folder saved by crispdiff.")
    parser.add_argument("--repo_id", required=True, help="Hub repository, 'owner/name' (or 'name' for your account).")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN / cached login).")
    parser.add_argument("--commit_message", default="Upload crispdiff pipeline", help="Commit message on the Hub.")
    parser.add_argument(
        "--license",
        default=None,
        help="License id for the model card metadata (e.g. apache-2.0; default: the --license the model was trained "
        "with, else 'other').",
    )
    parser.add_argument("--datasets", nargs="*", default=None, help="Hub dataset ids for the card (default: config).")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Push and print the repository URL; missing folders exit 2, failed uploads exit 1, both with a message."""
    return run_entry_point("crispdiff push", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    try:
        url = push_to_hub(
            args.pipeline_dir,
            args.repo_id,
            private=args.private,
            token=args.token,
            commit_message=args.commit_message,
            license=args.license,
            datasets=args.datasets,
        )
    except ValueError as err:  # a bad --repo_id; missing folders are PathErrors, reported by the crispdiff command
        raise FlagError(str(err)) from err
    except HubUploadError as err:  # not the user's input: the network, the token or the Hub (status 1, one line)
        report_user_error("crispdiff push", err)
        return 1
    print(f"uploaded {args.pipeline_dir} to {url}")
    return 0

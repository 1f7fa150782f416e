"""`specialist push RUN_OR_EXPORT --repo ORG/NAME`: an export folder, with its model card, onto the Hugging Face Hub.

It needs a network and a token (`--token`, else HF_TOKEN or the one `hf auth login` stored) and says so before
anything is sent. The card is rendered again with the repository's name in its loading snippets. Two files stay
on this machine: export_check.json (it holds held-out test prompts and answers) and export.json as written (it
names the run's folder on this disk); a copy of export.json without that path is uploaded, so specialist can still
load the downloaded folder.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from specialist.artifacts import EXPORT_FORMATS
from specialist.errors import ConfigError, SpecialistError
from specialist.run_folder import ExportFolder, RunFolder

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_TOKEN_HINT = "run `hf auth login`, set HF_TOKEN, or pass --token"  # huggingface-cli went in huggingface_hub 1.0


class PushError(SpecialistError):
    """The Hub could not be reached, or refused the upload."""

    exit_code = 1


def push_export(source: Path, repo: str, fmt: str | None = None, private: bool = False,
                token: str | None = None) -> str:
    """Create `repo` (if missing) and upload the export folder `source` (or a run's export of `fmt`) to it;
    returns the repository's URL."""
    check_repo_id(repo)
    export = find_export(Path(source), fmt)
    hub = import_hub()
    if hub_offline():
        raise PushError("HF_HUB_OFFLINE is set, and pushing needs the network",
                        hint="unset HF_HUB_OFFLINE on a machine that reaches huggingface.co")
    token = token or hub.get_token()
    if not token:
        raise ConfigError("no Hugging Face token found: pushing needs one with write access", hint=_TOKEN_HINT)
    check_plain_files(export.path)
    refresh_model_card(export, repo)
    api = hub.HfApi(token=token)
    with hub_errors(repo):
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo, folder_path=str(export.path), repo_type="model",
                          commit_message=f"specialist export ({export.meta()['format']})",
                          ignore_patterns=[export.check_file.name, export.meta_file.name])
        api.upload_file(path_or_fileobj=public_meta(export), path_in_repo=export.meta_file.name, repo_id=repo,
                        repo_type="model", commit_message="specialist export metadata")
    return str(url)


def check_plain_files(folder: Path) -> None:
    """Refuse, by name, anything in the export folder that is not a regular file or folder of its own: a symlink
    would upload the file it points to (anywhere on this disk) under the link's name. Exports write none."""
    odd = []
    for parent, folders, files in os.walk(folder, followlinks=False):
        for name in folders + files:
            path = Path(parent, name)
            if path.is_symlink():
                odd.append(f"{path.relative_to(folder)} -> {os.readlink(path)}")
            elif not (path.is_dir() or path.is_file()):
                odd.append(f"{path.relative_to(folder)} (not a regular file)")
    if odd:
        raise ConfigError(f"{folder} holds {len(odd)} link(s) or special file(s), and push uploads regular files "
                          f"inside the export only: {'; '.join(odd[:10])}",
                          hint="remove them (or copy the files they point to into the folder), then push again")


def check_repo_id(repo: str) -> None:
    if not isinstance(repo, str) or not _REPO_ID.match(repo) or ".." in repo:
        raise ConfigError(f"--repo {repo!r} is not a Hub repository id",
                          hint="write it as ORG/NAME, e.g. acme/log-parser")


def find_export(source: Path, fmt: str | None) -> ExportFolder:
    """The export folder `source` is, or the run folder `source`'s export of `fmt` (its only one when unnamed)."""
    if fmt is not None and fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}", hint=f"one of {', '.join(EXPORT_FORMATS)}")
    if ExportFolder.is_export(source):
        export = ExportFolder(source)
        found = export.meta()["format"]
        if fmt is not None and fmt != found:
            raise ConfigError(f"{source} is a {found} export, not {fmt}", hint=f"drop --format, or point at the "
                                                                                f"run's {fmt} export")
        return export
    if not RunFolder.is_run(source):
        raise ConfigError(f"{source} is neither an export folder nor a run folder",
                          hint="pass RUN_DIR/export/FORMAT, or a run folder with --format")
    run = RunFolder(source)
    made = [f for f in EXPORT_FORMATS if ExportFolder.is_export(run.export_dir(f))]
    if fmt is None and len(made) == 1:
        fmt = made[0]
    if fmt is None or fmt not in made:
        wanted = f"no {fmt} export" if fmt else ("no export" if not made else f"exports {', '.join(made)}")
        raise ConfigError(f"{source} has {wanted}",
                          hint=("choose one with --format" if made and fmt is None
                                else f"export it first: specialist export {source} --format {fmt or 'merged'}"))
    return ExportFolder(run.export_dir(fmt))


def import_hub():
    try:
        import huggingface_hub
    except ImportError as exc:
        raise ConfigError("pushing to the Hugging Face Hub needs the package huggingface_hub",
                          hint="pip install huggingface_hub") from exc
    return huggingface_hub


def hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or flag in ("1", "true", "yes", "on")


def refresh_model_card(export: ExportFolder, repo: str) -> None:
    """The card again, naming `repo` in its loading snippets (kept as it is when its run is not on this disk)."""
    from specialist.deploy.model_card import write_model_card

    run = export.source_run()
    if run is not None or not export.model_card.is_file():
        write_model_card(export, run, repo_id=repo)


def public_meta(export: ExportFolder) -> bytes:
    """export.json without the local path of the run it came from."""
    meta: dict[str, Any] = {k: v for k, v in export.meta().items() if k != "run"}
    return json.dumps(meta, indent=2, ensure_ascii=False).encode("utf-8")


class hub_errors:
    """Hub and network failures as a PushError that says what to do."""

    def __init__(self, repo: str) -> None:
        self.repo = repo

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, SpecialistError):
            return False
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(exc, HfHubHTTPError) and status in (401, 403):
            raise PushError(f"the Hub refused the token for {self.repo} (HTTP {status})",
                            hint=f"use a token with write access to {self.repo.split('/')[0]}; {_TOKEN_HINT}") from exc
        if isinstance(exc, HfHubHTTPError):
            raise PushError(f"the Hub answered HTTP {status} for {self.repo}: {str(exc).splitlines()[0]}",
                            hint="check the repository name and your rights to it, then push again") from exc
        if isinstance(exc, (OfflineModeIsEnabled, OSError)) or _is_network_error(exc):
            raise PushError(f"could not reach the Hugging Face Hub ({type(exc).__name__}: {exc})",
                            hint="pushing needs a network that reaches huggingface.co; push again from one") from exc
        return False


def _is_network_error(exc: BaseException) -> bool:
    """httpx's transport errors (the Hub client's), without importing httpx where it is absent."""
    return any(cls.__module__.startswith(("httpx", "httpcore", "requests", "urllib3")) for cls in type(exc).__mro__)

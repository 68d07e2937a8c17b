"""Files a command writes on request (``preview --trace``, ``report --html``, state backups):
never over what the programme itself lives on.

A typo or a tab completion must not turn ``--trace state/loyalty.db`` into a lost state
database, nor ``--html rules/programme.yaml`` into a lost rule file. The check resolves
symbolic links, so a link pointing at a protected file is refused too.
"""

from __future__ import annotations

from pathlib import Path

from engine.config.loading import SETTINGS_FILE
from engine.config.model import LoadedWorkspace
from engine.errors import UsageError
from engine.execution.partitioned_data import partitioned_folder

STATE_SUFFIXES = ("", "-wal", "-shm", "-journal", ".lock")   # SQLite's companions of a database file
WORKSPACE_FOLDERS = ("rules", "templates", "tests")          # what marketers write


def protected_paths(workspace: LoadedWorkspace) -> dict[Path, str]:
    """Every file (or folder) a command must never write over, with what it is, in plain words."""
    root = workspace.root.resolve()
    settings = workspace.settings
    protected = {(root / SETTINGS_FILE).resolve(): "the programme's settings (loyalty.yaml)",
                 partitioned_folder(root).resolve(): "the partitioned copy of the data"}
    for folder in WORKSPACE_FOLDERS:
        protected[(root / folder).resolve()] = f"the workspace's {folder}/ folder"
    state = settings.state_path.resolve()
    for suffix in STATE_SUFFIXES:
        protected[state.with_name(state.name + suffix)] = "the state database"
    for table, source in settings.data.items():
        if source.path is not None:
            protected[(root / source.path).resolve()] = f"the {table} data"
    for name, channel in settings.channels.items():
        if channel.send == "file" and channel.options.get("path"):
            protected[(root / str(channel.options["path"])).resolve()] = f"the {name} channel's outbox file"
    return protected


def check_output(workspace: LoadedWorkspace, path: Path | str) -> Path:
    """``path`` resolved, when a command may write a new file there; else a UsageError (exit 2)
    saying what the file is."""
    target = Path(path).expanduser().resolve()
    if target.is_dir():
        raise UsageError(f"{path} is a folder: give a file name for the output")
    for protected, what in protected_paths(workspace).items():
        if target == protected or protected in target.parents:
            raise UsageError(f"refusing to write {path}: it is {what}; choose another file name "
                             "(for example in an output/ folder)")
    return target

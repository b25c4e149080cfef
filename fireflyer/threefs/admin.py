"""admin_cli: the commands the operator issues and the parsing of what admin_cli prints.

An admin step runs its commands in order inside one admin Job; the Job's output is the
concatenation of each command's output, each introduced by a line `$ <command>`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from fireflyer.api.threefs import ThreeFSClusterSpec
from fireflyer.threefs.chaintable import CHAIN_TABLE_ID, ChainTable
from fireflyer.threefs.config import CONFIG_DIR

COMMAND_MARK = "$ "
FILES_DIR = "/etc/3fs/admin/files"
USER_ADD = "user-add"
TOKEN_PATTERN = re.compile(r"^Token\s+(\S+?)\(Expired at [^)]*\)\s*$", re.MULTILINE)
# Any `Token <value>` line admin_cli prints (user-add, user-stat, current-user, …).
TOKEN_LINE = re.compile(r"^(Token[ \t]+)[^(\s]+", re.MULTILINE)
REDACTED = "<redacted>"


class AdminOutputError(ValueError):
    """admin_cli printed something the operator cannot read."""


@dataclass(frozen=True)
class AdminStep:
    """One admin Job: commands run in order (the first failure stops it) and the files they read."""

    name: str
    commands: tuple[str, ...]
    files: dict[str, str] = field(default_factory=dict)


def init_cluster(spec: ThreeFSClusterSpec) -> AdminStep:
    return AdminStep(
        "init-cluster",
        (
            f"init-cluster --mgmtd {CONFIG_DIR}/mgmtd/mgmtd_main.toml {CHAIN_TABLE_ID}"
            f" {spec.storage.chunk_size} {spec.storage.stripe_size}",
        ),
    )


def set_config(service: str) -> AdminStep:
    kind, path = {
        "meta": ("META", f"{CONFIG_DIR}/meta/meta_main.toml"),
        "storage": ("STORAGE", f"{CONFIG_DIR}/storage/storage_main.toml"),
        "fuse": ("FUSE", f"{CONFIG_DIR}/fuse/hf3fs_fuse_main.toml"),
    }[service]
    return AdminStep(f"set-config-{service}", (f"set-config --type {kind} --file {path}",))


def user_add() -> AdminStep:
    return AdminStep(USER_ADD, ("user-add --root --admin 0 root",))


def create_targets(table: ChainTable) -> AdminStep:
    return AdminStep("create-targets", tuple(table.create_target_commands()))


def upload_chains(table: ChainTable) -> AdminStep:
    return AdminStep(
        "upload-chains",
        (f"upload-chains {FILES_DIR}/chains.csv",),
        {"chains.csv": table.chains_csv()},
    )


def upload_chain_table(table: ChainTable) -> AdminStep:
    return AdminStep(
        "upload-chain-table",
        (f"upload-chain-table --desc stage {CHAIN_TABLE_ID} {FILES_DIR}/chain_table.csv",),
        {"chain_table.csv": table.chain_table_csv()},
    )


def health(sequence: int) -> AdminStep:
    return AdminStep(f"health-{sequence}", ("list-chains", "list-targets"))


# ---------------------------------------------------------------------------------------------
# output


def split_output(output: str) -> list[tuple[str, str]]:
    """[(command, its output)] from an admin Job's combined output."""
    sections: list[tuple[str, list[str]]] = []
    for line in output.splitlines():
        if line.startswith(COMMAND_MARK):
            sections.append((line[len(COMMAND_MARK) :].strip(), []))
        elif sections:
            sections[-1][1].append(line)
    return [(command, "\n".join(lines)) for command, lines in sections]


def redact(output: str) -> str:
    """admin_cli output with every token blanked out, as the admin Job stores it; the operator
    applies it again before output reaches status or an Event."""
    return TOKEN_LINE.sub(rf"\1{REDACTED}", output)


def parse_token(output: str) -> str:
    match = TOKEN_PATTERN.search(output)
    if not match:
        raise AdminOutputError("user-add printed no `Token <token>(Expired at …)` line")
    return match.group(1)


@dataclass(frozen=True)
class TargetRow:
    target_id: int
    chain_id: int
    role: str
    public_state: str  # SERVING, SYNCING, WAITING, LASTSRV, OFFLINE
    local_state: str
    node_id: int | None
    disk: int | None
    used_bytes: int


@dataclass(frozen=True)
class ChainRow:
    chain_id: int
    version: int
    status: str  # SERVING, SYNCING, UNAVAILABLE or SERVING(k/n)
    targets: tuple[tuple[int, str], ...]  # (target id, public state)


def _table(text: str, first_column: str) -> list[list[str]]:
    rows = [line.split() for line in text.splitlines() if line.strip()]
    for index, row in enumerate(rows):
        if row and row[0] == first_column:
            return rows[index + 1 :]
    raise AdminOutputError(f"no table with a {first_column} column in the output")


def _optional_int(text: str) -> int | None:
    return None if text == "N/A" else int(text)


def parse_list_targets(text: str) -> list[TargetRow]:
    try:
        return [
            TargetRow(
                int(r[0]), int(r[1]), r[2], r[3], r[4], _optional_int(r[5]), _optional_int(r[6]), int(r[7])
            )
            for r in _table(text, "TargetId")
        ]
    except (IndexError, ValueError) as error:
        raise AdminOutputError(f"list-targets: unreadable row ({error})") from error


CHAIN_TARGET = re.compile(r"^(\d+)\(([A-Z]+)-([A-Z]+)\)$")


def parse_list_chains(text: str) -> list[ChainRow]:
    rows = []
    try:
        for r in _table(text, "ChainId"):
            targets = []
            for cell in r[5:]:
                match = CHAIN_TARGET.match(cell)
                if not match:
                    raise ValueError(f"target cell {cell!r}")
                targets.append((int(match.group(1)), match.group(2)))
            rows.append(ChainRow(int(r[0]), int(r[2]), r[3], tuple(targets)))
    except (IndexError, ValueError) as error:
        raise AdminOutputError(f"list-chains: unreadable row ({error})") from error
    return rows


@dataclass(frozen=True)
class Health:
    chains: list[ChainRow]
    targets: list[TargetRow]

    def chain_counts(self) -> dict[str, int]:
        serving = sum(1 for c in self.chains if c.status == "SERVING")
        return {"total": len(self.chains), "serving": serving, "degraded": len(self.chains) - serving}

    def target_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(t.public_state.lower() for t in self.targets).items()))

    def used_bytes(self) -> int:
        return sum(t.used_bytes for t in self.targets)

    def all_serving(self) -> bool:
        return bool(self.chains) and all(c.status == "SERVING" for c in self.chains)


def parse_health(output: str) -> Health:
    sections = dict(split_output(output))
    if "list-chains" not in sections or "list-targets" not in sections:
        raise AdminOutputError("health output lacks list-chains or list-targets")
    return Health(parse_list_chains(sections["list-chains"]), parse_list_targets(sections["list-targets"]))

"""One step of the GPU check as a process: its own session, a time limit, its output streamed to a log file, and at
the limit the whole of it killed, children included.

A step is killed with every process it started: its process group (`os.killpg`) and every
descendant found through the parent links in /proc, since some launchers start their workers in sessions of
their own (torch.distributed.run does: a killed launcher would leave its ranks holding the GPU). After a kill
the step's processes are looked for again; any still alive are named in the outcome.

Output is unbuffered (`PYTHONUNBUFFERED=1`) and goes straight into the log file (the child writes to it, nothing
is held in a pipe), so a step killed at its limit leaves everything it printed.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence


@dataclass
class Outcome:
    """What became of one step.

    - code: exit status; None when killed at its limit.
    - seconds: wall time from the start to the end (or to the kill).
    - killed: pids killed besides the step's own process: at the limit its children, grandchildren, ...; after
      a normal end, whatever it left running in its group.
    - left: pids of the step still alive after the kill (should be empty).
    """
    code: Optional[int]
    seconds: float
    killed: List[int] = field(default_factory=list)
    left: List[int] = field(default_factory=list)

    @property
    def timed_out(self) -> bool:
        return self.code is None

    def describe(self) -> str:
        left = f"{len(self.left)} LEFT ALIVE: {', '.join(map(str, self.left))}" if self.left else "none left"
        if self.timed_out:
            return f"timed out: killed with {len(self.killed)} process(es) it started, {left}"
        status = "ok" if self.code == 0 else f"failed (exit {self.code})"
        if self.killed:
            status += f"; {len(self.killed)} process(es) it left running killed, {left}"
        return status


def _processes() -> Dict[int, tuple]:
    """pid -> (state, parent pid, process group) of every process (/proc/PID/stat)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (name) "
        table[int(entry.name)] = (fields[0], int(fields[1]), int(fields[2]))
    return table


def members(leader: int, known: Sequence[int] = ()) -> List[int]:
    """Live processes (zombies excluded) of the step whose first process is `leader`: its process group, its
    descendants (whatever their session), and those of `known` still alive (found earlier, perhaps orphaned
    since)."""
    table = _processes()
    found = {pid for pid, (_, _, group) in table.items() if group == leader}
    found |= {pid for pid in known if pid in table}
    if leader in table:
        found.add(leader)
    grew = True
    while grew:  # descendants, whatever their session
        more = {pid for pid, (_, parent, _) in table.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return sorted(pid for pid in found if table[pid][0] not in ("Z", "X"))


def kill_step(leader: int, grace: float = 5.0) -> tuple:
    """Kill every process of the step (`members`); (killed pids other than the leader, pids still alive after
    `grace` seconds). Only processes found in the step's group or below its live processes are killed, never a
    pid remembered from before (it could have been given to another process since)."""
    killed = set()
    deadline = time.monotonic() + grace
    while True:
        found = members(leader)
        try:  # the group's id is the leader's pid, which stays reserved until the leader is reaped (run_step)
            os.killpg(leader, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in found:  # and those that left the group (own sessions), and the group itself again
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except (ProcessLookupError, PermissionError):
                pass
        alive = members(leader, killed)
        if not alive or time.monotonic() > deadline:
            return sorted(killed - {leader}), alive
        time.sleep(0.05)


def _exited(process: subprocess.Popen) -> bool:
    """Whether the process has ended, without reaping it: until `wait`, its pid (and so its process group's id)
    cannot be given to another process, so the group can still be swept safely."""
    return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def run_step(command: Sequence[str], limit: float, log: Path, cwd: Path, env: Dict[str, str]) -> Outcome:
    """Run `command` in a session of its own (cwd, env + PYTHONUNBUFFERED=1), stdout and stderr appended to
    `log`. At `limit` seconds every process of it is killed (`kill_step`); when it ends by itself, whatever it
    left running in its group is killed too (and listed in `killed`)."""
    start = time.monotonic()
    with open(log, "ab", buffering=0) as handle:
        process = subprocess.Popen(list(command), cwd=cwd, env={**env, "PYTHONUNBUFFERED": "1"},
                                   stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        while not _exited(process) and time.monotonic() - start < limit:
            time.sleep(0.05)
        seconds = time.monotonic() - start
        timed_out = not _exited(process)
        killed, left = kill_step(process.pid)
    except BaseException:  # the check itself interrupted: leave nothing of the step behind
        kill_step(process.pid)
        process.wait()
        raise
    code = process.wait()
    return Outcome(None if timed_out else code, seconds, killed, left)

"""The rehearsal's planted step (`gpu_check.py --rehearse`): it overruns any limit, so the check must kill it and
its children.

It prints which steps the check's results file (rewritten after every step) listed when it started, then starts
two children that print their pids and sleep, one in its own process group and one in a session of its own (as
torch.distributed.run starts its ranks), and sleeps itself. Tests read the pids from the log and check that
no process is left.

    python benchmarks/planted_overrun.py RESULTS_JSON
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# one write() per line: the three processes print into one log at once
SLEEPER = "import os, time; os.write(1, f'planted child pid {os.getpid()}\\n'.encode()); time.sleep(600)"


def main():
    results = Path(sys.argv[1])
    steps = json.loads(results.read_text())["steps"] if results.exists() else []
    done = [f"{s['name']} ({s['status']})" for s in steps if s["status"] not in ("pending", "running")]
    print(f"planted: the results file lists {len(done)} finished step(s): {', '.join(done) or 'none'}")
    print(f"planted step pid {os.getpid()}: sleeping past its limit", flush=True)
    for own_session in (False, True):
        subprocess.Popen([sys.executable, "-c", SLEEPER], start_new_session=own_session)
    time.sleep(600)


if __name__ == "__main__":
    main()

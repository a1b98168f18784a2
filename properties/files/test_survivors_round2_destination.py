"""convert's clean-up of temporary folders, for the survivor of the second mutation run
(reports/mutation/verdicts-messages-writes.txt) in verify/files/destination.py: asking whether a folder's process
is alive must not signal it."""

from __future__ import annotations

import subprocess
import time

from verify.files import destination


def test_a_live_convert_keeps_its_folder_and_is_not_signalled(tmp_path):
    """Kills x__alive__mutmut_5 (os.kill(pid, 1): the liveness check sends SIGHUP, which ends the other convert):
    the folder of a live process on this host is left alone, nothing is said, and the process lives on."""
    other = subprocess.Popen(["sleep", "30"])
    try:
        live = tmp_path / f".out.{destination.host()}-{other.pid}.abcd1234{destination.TMP_SUFFIX}"
        live.mkdir()
        said: list[str] = []
        destination.remove_stale_temporaries(tmp_path / "out", said.append)
        assert live.is_dir() and said == []
        time.sleep(0.2)  # a signal, had one been sent, has been delivered by now
        assert other.poll() is None, f"the other process ended (status {other.returncode})"
    finally:
        other.kill()
        other.wait()

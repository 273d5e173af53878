"""Progress: tqdm's bar on a terminal; plain log lines off one (a log file, a pipe, CI); and a last line that
says where the checkpoint is and the meta-loss the run ended with."""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

from meta_train import checkpoint

OVERRIDES = ["train.iterations=40", "train.meta_batch=2",
         "train.log_every=10", "train.checkpoint_every=0", "model.hidden=[8]"]


def cmd(out, *extra):
    return [sys.executable, "-m", "meta_train", "train", "--out", str(out), *extra, *OVERRIDES]


def test_off_a_terminal_progress_is_plain_lines_and_the_last_line_has_the_meta_loss(tmp_path):
    proc = subprocess.run(cmd(tmp_path / "r", "train.progress_every_s=0"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("meta-train: ")]
    assert [re.match(r"meta-train: (\d+)/40 ", ln).group(1) for ln in lines] == ["10", "20", "30", "40"]
    assert all(re.search(r"it/s, meta-loss \d", ln) for ln in lines), lines
    ckpt = checkpoint.load(tmp_path / "r")
    assert proc.stdout.strip().splitlines()[-1] == (
        f"checkpoint: {tmp_path / 'r' / 'checkpoint.pt'} (iteration 40, final meta-loss {ckpt['meta_loss']:.6g} "
        f"(moving average {ckpt['meta_loss_ema']:.6g}))")


def test_lines_are_rate_limited_but_the_end_is_always_logged(tmp_path):
    proc = subprocess.run(cmd(tmp_path / "r", "--max-iterations", "25"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("meta-train: ")]
    assert len(lines) == 1 and lines[0].startswith("meta-train: 25/40 ")  # 30 s apart by default; the stop


def test_on_a_terminal_it_is_a_tqdm_bar(tmp_path):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a real terminal has a size
    proc = subprocess.Popen(cmd(tmp_path / "r"), stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "\r" in text and "40/40" in text and "meta-loss" in text and "|" in text

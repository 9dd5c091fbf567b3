"""nanocausal.plot: `python -m nanocausal.plot` writes a valid PNG for one run and for two overlaid,
draws only the panels whose keys a run logged, and says in one line (file, line) what is wrong with
an empty or malformed metrics.jsonl."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanocausal import plot

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(folder, rl=True, steps=12, eval_every=4):
    """A synthetic metrics.jsonl with the keys the loop writes (RL's, or SFT's), evaluations included."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for step in range(steps + 1):
        if step % eval_every == 0:
            rows.append({"step": step, "eval_acc": 0.2 + 0.02 * step, "eval_acc_ATE": 0.3, "time": step * 0.5})
        if step == 0:
            continue
        row = {"step": step, "lr": 1e-5, "loss": 1.0 / step, "grad_norm": 0.5 + 0.01 * step, "step_s": 0.2}
        if rl:
            row.update(reward=0.1 * step, accuracy=0.05 * step, completion_len=40 + step, completion_len_max=64,
                       truncated=0.1, entropy=1.5 - 0.05 * step, kl=0.01 * step, generation_s=0.1, training_s=0.08)
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def run_plot(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "nanocausal.plot", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def assert_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000


def test_one_run_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "grpo")
    done = run_plot(run)
    assert done.returncode == 0, done.stderr
    assert_png(run / "curves.png")  # the default --out for one run
    assert "reward and accuracy" in done.stdout and "KL and entropy" in done.stdout


def test_two_named_runs_overlaid_in_one_png(tmp_path):
    pytest.importorskip("matplotlib")
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b", rl=False)
    done = run_plot(f"lr3e-5={a}", b / "metrics.jsonl", "--out", tmp_path / "figs" / "both.png", "--smooth", "0.6")
    assert done.returncode == 0, done.stderr
    assert_png(tmp_path / "figs" / "both.png")


def test_only_panels_whose_keys_were_logged(tmp_path):
    pytest.importorskip("matplotlib")
    sft = write_run(tmp_path / "sft", rl=False)
    panels = plot.plot_runs([sft], tmp_path / "sft.png")
    assert panels == ["reward and accuracy", "loss", "grad norm (before clipping)", "seconds per step"]  # eval_acc
    rl = write_run(tmp_path / "rl")
    panels = plot.plot_runs([sft, rl], tmp_path / "both.png", names=["sft", "grpo"])
    assert panels == ["reward and accuracy", "completion length (tokens)", "truncated (share of completions)",
                      "KL and entropy", "loss", "grad norm (before clipping)", "seconds per step"]
    assert_png(tmp_path / "both.png")


def one_line_error(done, path):
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], done.stderr
    return lines[0]


def test_empty_metrics_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / "metrics.jsonl"
    path.write_text("\n")
    assert "no rows" in one_line_error(run_plot(tmp_path / "run"), path)


def test_malformed_metrics_is_one_line_naming_file_and_line(tmp_path):
    run = write_run(tmp_path / "run")
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + '{"step": 1, "loss": oops}\n' + "".join(lines[2:]))
    assert f"{path}:2: not valid JSON" in one_line_error(run_plot(run), path)
    path.write_text('{"step": 1}\n[1, 2]\n')
    assert f"{path}:2: expected a JSON object" in one_line_error(run_plot(run), path)
    path.write_text('{"loss": 1.0}\n')
    assert f"{path}:1: no numeric \"step\"" in one_line_error(run_plot(run), path)


def test_missing_run_and_nothing_to_plot(tmp_path):
    assert "no such file" in one_line_error(run_plot(tmp_path / "nowhere"), tmp_path / "nowhere" / "metrics.jsonl")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "mystery": 2.0}\n')
    assert "nothing to plot" in one_line_error(run_plot(run), run / "metrics.jsonl")


def test_a_half_written_last_line_of_a_live_run_is_left_out(tmp_path):
    path = write_run(tmp_path / "run") / "metrics.jsonl"
    rows = plot.read_metrics(path)
    with open(path, "a") as f:
        f.write('{"step": 13, "loss": 0.0')  # the loop is writing this line right now
    assert plot.read_metrics(path) == rows


def test_missing_matplotlib_is_one_line(tmp_path, monkeypatch):
    for module in ("matplotlib", "matplotlib.backends.backend_agg", "matplotlib.figure", "matplotlib.lines"):
        monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"^plotting needs matplotlib: pip install matplotlib"):
        plot.plot_runs([write_run(tmp_path / "run")], tmp_path / "x.png")


def test_smoothing_is_a_bias_corrected_ema():
    rows = [{"step": s, "reward": 1.0} for s in range(1, 5)] + [{"step": 5, "reward": float("nan")}]
    assert plot.curve(rows, "reward", smooth=0.9) == ([1, 2, 3, 4], pytest.approx([1.0] * 4))  # no pull to 0
    rows = [{"step": 1, "reward": 0.0}, {"step": 2, "reward": 1.0}]
    assert plot.curve(rows, "reward", smooth=0.5)[1] == pytest.approx([0.0, 0.5 / 0.75])

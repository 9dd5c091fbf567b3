"""nanocausal.tracking: what a backend receives equals the rows of metrics.jsonl (TensorBoard read back
from its event files; wandb offline and trackio's local store when installed), a missing package is
one line before training, a backend failing mid-run is one warning and the run goes on."""
import glob
import importlib.util
import json
import os
import struct
import subprocess
import sys
import time

import pytest

from nanocausal import tracking
from nanocausal.training import MetricsLog

RECORDS = [{"type": "ATE", "variant": "base", "answer": "0.25", "response": "so the ATE is 0.25 | done\nANSWER: 0.25",
            "correct": True, "extra": "not a column"},
           {"type": "PN", "variant": "base", "answer": "0.5", "response": "", "correct": False}]


def metrics_rows(tmp_path):
    """Rows exactly as the loop writes them: through MetricsLog to metrics.jsonl, read back."""
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.log(step=0, eval_acc=0.25, eval_acc_ATE=0.5)
    for step in range(1, 4):
        log.log(step=step, lr=1e-5 * step, loss=2.0 / step, reward=0.1 * step, grad_norm=0.5, epoch=0, step_s=0.01)
    log.log(step=3, eval_acc=0.75, eval_acc_ATE=1.0)  # an evaluation shares its step with the step's row
    log.close()
    with open(tmp_path / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def expected_scalars(rows):
    """{key: [(step, value), ...]}: what every backend should hold, "step" being the axis and
    "time" left to the tracker's own clock."""
    out = {}
    for row in rows:
        for key, value in row.items():
            if key not in ("step", "time"):
                out.setdefault(key, []).append((row["step"], float(value)))
    return out


class StubBackend:
    name = "stub"

    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def log(self, values, step):
        if self.fail_on == "log":
            raise OSError("disk full")
        self.calls.append(("log", step, values))

    def log_completions(self, step, rows):
        self.calls.append(("log_completions", step, rows))

    def finish(self):
        self.calls.append(("finish",))


def test_none_is_a_no_op(tmp_path):
    tracker = tracking.start("none", out_dir=str(tmp_path / "out"))
    assert tracker.backends == []
    tracker.log({"step": 1, "loss": 1.0}, 1)
    tracker.log_completions(1, RECORDS)
    tracker.finish()
    assert not (tmp_path / "out").exists()
    assert tracking.start(None).backends == []


def test_unknown_backend_is_one_line():
    with pytest.raises(ValueError, match=r"--report-to: unknown mlflow \(expected one or more of none, wandb"):
        tracking.start("tensorboard,mlflow")


def test_check_names_the_backends_to_start():
    assert tracking.check("none") == [] and tracking.check(" none , ") == []
    pytest.importorskip("tensorboard")
    assert tracking.check("tensorboard,none,tensorboard") == ["tensorboard"]


def test_tracker_forwards_numeric_values_and_completion_columns(tmp_path):
    rows = metrics_rows(tmp_path) + [{"step": 4, "note": "a string is not a scalar", "loss": 0.4, "time": 1.0}]
    assert all("time" in row for row in rows)  # MetricsLog stamps it; the trackers keep their own clock
    stub = StubBackend()
    tracker = tracking.Tracker([stub])
    for row in rows:
        tracker.log(row, row["step"])
    tracker.log_completions(3, RECORDS)
    tracker.finish()
    logged = [(step, values) for kind, step, values in (c for c in stub.calls if c[0] == "log")]
    assert logged == [(row["step"], {k: float(v) for k, v in row.items() if k not in ("step", "time", "note")})
                      for row in rows]
    assert ("log_completions", 3, [["ATE", "base", "0.25", RECORDS[0]["response"], True],
                                   ["PN", "base", "0.5", "", False]]) in stub.calls
    assert stub.calls[-1] == ("finish",)


def test_a_failing_backend_warns_once_and_the_others_go_on(capsys):
    broken, working = StubBackend(fail_on="log"), StubBackend()
    broken.name = "wandb"
    tracker = tracking.Tracker([broken, working])
    for step in range(1, 4):
        tracker.log({"step": step, "loss": 1.0}, step)
    tracker.finish()
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --report-to wandb: log failed (OSError: disk full); "
                        "no more reporting to it, metrics.jsonl goes on"]
    assert [c[1] for c in working.calls if c[0] == "log"] == [1, 2, 3]
    assert broken.calls == []  # dropped: not even finish()


@pytest.mark.parametrize("name", ["wandb", "trackio", "tensorboard"])
def test_missing_package_is_one_line_before_training(monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # what `import name` sees when it is not installed
    with pytest.raises(ValueError) as error:
        tracking.start(name, out_dir="unused")
    message = str(error.value)
    assert message.startswith(f"--report-to {name} needs the {name} package: pip install {name}")
    assert "\n" not in message


def test_missing_package_stops_every_rank_but_only_rank_0_reports(monkeypatch, tmp_path):
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("RANK", "1")
    tracker = tracking.start("tensorboard", "r", "p", str(tmp_path))
    assert tracker.backends == [] and not (tmp_path / "tensorboard").exists()
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ValueError, match="needs the tensorboard package"):
        tracking.start("tensorboard", "r", "p", str(tmp_path))


def test_a_backend_that_cannot_start_is_one_line(tmp_path):
    pytest.importorskip("tensorboard")
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(ValueError, match=r"^--report-to tensorboard: could not start \(NotADirectoryError"):
        tracking.start("tensorboard", "r", "p", str(tmp_path / "a_file"))


def test_tensorboard_event_files_hold_the_metrics_rows(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = metrics_rows(tmp_path)
    tracker = tracking.start("tensorboard", "grpo-test", "nanocausal", str(tmp_path), {"lr": 1e-5, "tasks": ("ATE",)})
    for row in rows:
        tracker.log(row, row["step"])
    tracker.log_completions(3, RECORDS)
    tracker.finish()

    events = EventAccumulator(str(tmp_path / "tensorboard" / "grpo-test"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    expected = expected_scalars(rows)
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for key, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [step for step, _ in got] == [step for step, _ in points]
        assert [value for _, value in got] == pytest.approx([value for _, value in points], rel=1e-6)  # float32
    (completions,) = events.Tensors("completions/text_summary")
    text = completions.tensor_proto.string_val[0].decode()
    assert completions.step == 3
    assert "**ATE base**, gold `0.25`, correct" in text and "    ANSWER: 0.25" in text and "**PN base**" in text
    (config,) = events.Tensors("config/text_summary")
    assert '"tasks": [' in config.tensor_proto.string_val[0].decode()


def read_wandb_history(run_file):
    """The history rows of an offline .wandb file: a LevelDB-style log (32 KiB blocks, each record
    a 7-byte header crc32/length/type, types 1 full, 2 first, 3 middle, 4 last) of protobuf Records;
    and whether it is complete (its "exit" record, wandb's last, is there)."""
    from wandb.proto import wandb_internal_pb2

    data = open(run_file, "rb").read()
    position, block, pending, history, exited = 7, 32768, b"", [], False  # the file opens with a 7-byte ":W&B" header
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            exited = exited or record.WhichOneof("record_type") == "exit"
            if record.WhichOneof("record_type") == "history":
                # wandb-core puts a name in key or, split on "/", in nested_key
                item = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item}
                history.append({**item, "_step": record.history.step.num})  # the row's step=, also when 0
    return history, exited


def test_wandb_offline_run_holds_the_metrics_rows(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    for variable in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no stored key: offline by our rule
    monkeypatch.setenv("WANDB_SILENT", "true")
    rows = metrics_rows(tmp_path)
    tracker = tracking.start("wandb", "dpo-test", "nanocausal", str(tmp_path), {"lr": 1e-5})
    for row in rows:
        tracker.log(row, row["step"])
    tracker.log_completions(3, RECORDS)
    tracker.finish()

    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    for _ in range(300):  # wandb's service process may still be writing the file after finish() returns
        history, complete = read_wandb_history(run_file)
        if complete:
            break
        time.sleep(0.1)
    assert complete, f"{run_file}: wandb did not finish writing it in 30 s"
    got = {}
    for item in history:
        for key, value in item.items():
            if not key.startswith("_") and not key.startswith("completions"):
                got.setdefault(key, []).append((item["_step"], float(value)))
    assert got == expected_scalars(rows)
    assert any(item.get("completions/_type") == "table-file" and item.get("completions/nrows") == 2 for item in history)


TRACKIO_SCRIPT = """
import json, sys
from nanocausal import tracking
rows = json.loads(sys.argv[1])
tracker = tracking.start("trackio", "kto-test", "nanocausal-test", "unused", {"lr": 1e-5})
for row in rows:
    tracker.log(row, row["step"])
tracker.log_completions(3, json.loads(sys.argv[2]))
tracker.finish()
from trackio.sqlite_storage import SQLiteStorage
print("LOGS " + json.dumps(SQLiteStorage.get_logs("nanocausal-test", "kto-test"), default=str))
"""


def test_trackio_local_store_holds_the_metrics_rows(tmp_path):
    if importlib.util.find_spec("trackio") is None:
        pytest.skip("trackio is not installed")
    rows = metrics_rows(tmp_path)
    # A fresh interpreter: trackio reads TRACKIO_DIR (its local store) once, when imported.
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}
    done = subprocess.run([sys.executable, "-c", TRACKIO_SCRIPT, json.dumps(rows), json.dumps(RECORDS)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    logs = json.loads(done.stdout.split("LOGS ", 1)[1])
    got = {}
    for item in logs:
        for key, value in item.items():
            if key not in ("step", "timestamp", "completions"):
                got.setdefault(key, []).append((item["step"], float(value)))
    assert got == expected_scalars(rows)
    (table,) = [item["completions"] for item in logs if "completions" in item]
    assert [r["type"] for r in table["_value"]] == ["ATE", "PN"]

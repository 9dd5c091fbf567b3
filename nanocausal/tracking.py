"""Optional experiment tracking: the rows the loop writes to metrics.jsonl, also sent to Weights &
Biases, trackio or TensorBoard, so a long run can be watched while it trains.

    python train_rl.py ... --report-to tensorboard      # then: tensorboard --logdir OUT_DIR/tensorboard
    python train_rl.py ... --report-to wandb --project nanocausal --run-name grpo-lr3e-5
    python train_rl.py ... --report-to trackio          # then: trackio show --project nanocausal
    python train_rl.py ... --report-to wandb,tensorboard    # several at once

metrics.jsonl stays the record of a run (plot it with `python -m nanocausal.plot OUT_DIR`); a
tracker is a second copy for watching: each backend receives the numeric values of each row at
x = row["step"] (scalars()), the sampled evaluation completions as a table (wandb, trackio) or
markdown text (TensorBoard), and the run's config once.

Conventions pinned here:
- Each backend is imported only when asked for. A missing package is a ValueError of one line
  ("--report-to wandb needs the wandb package: pip install wandb ...") raised by check() and
  start(), before any training, on every rank, so that no rank trains while another has stopped.
- Under torchrun only rank 0 reports (RANK, as torchrun sets it); the other ranks get the no-op
  tracker, since every rank logs the same rows.
- wandb without network or account: when WANDB_MODE is unset and no API key is found
  (WANDB_API_KEY, or the ~/.netrc entry `wandb login` writes), the run is logged offline under
  OUT_DIR/wandb (sync later with `wandb sync OUT_DIR/wandb/offline-run-*`). A set WANDB_MODE
  (online, offline, disabled) is always obeyed. trackio always uses its local store
  (TRACKIO_DIR, default ~/.cache/huggingface/trackio); TensorBoard writes OUT_DIR/tensorboard/RUN_NAME.
- A failure at start (wandb.init refused) is a ValueError before training; a failure while the run
  trains (disk full, a server gone) prints one warning, stops reporting to that backend, and the
  run goes on: an hours-long run never dies for its dashboard.
- --resume starts a new tracker run (wandb, trackio) or a new event file (TensorBoard) from the
  checkpoint's step; metrics.jsonl is the one continuous log.
"""
import importlib
import json
import netrc
import numbers
import os
from urllib.parse import urlparse

from tqdm import tqdm

COMPLETION_COLUMNS = ("type", "variant", "answer", "response", "correct")


def start(report_to="none", run_name=None, project="nanocausal", out_dir="out/run", config=None):
    """A Tracker reporting to each backend of report_to; run_name defaults to out_dir's folder name;
    config (a dict) is stored with the run."""
    names = check(report_to)  # on every rank: a missing package stops all of them, before training
    if not names or int(os.environ.get("RANK", "0")) != 0:
        return Tracker([])
    run_name = run_name or os.path.basename(os.path.normpath(out_dir))
    opened = []
    for name in names:
        try:
            opened.append(BACKENDS[name](name, run_name, project, out_dir, config or {}))
        except Exception as e:
            for backend in opened:  # leave no half-started run behind
                backend.finish()
            raise ValueError(f"--report-to {name}: could not start ({type(e).__name__}: {one_line(e)})") from e
    return Tracker(opened)


def check(report_to):
    """The backends named in report_to (without "none" and repeats), each package imported;
    ValueError (one line) for an unknown name or a missing package. A script can call it right
    after parsing its flags, to fail before it loads a model."""
    names = [name.strip() for name in (report_to or "none").split(",") if name.strip()]
    unknown = [name for name in names if name != "none" and name not in BACKENDS]
    if unknown:
        raise ValueError(f"--report-to: unknown {', '.join(unknown)} "
                         f"(expected one or more of {', '.join(['none', *BACKENDS])})")
    names = [name for name in dict.fromkeys(names) if name != "none"]  # dict: drop repeats, keep order
    for name in names:
        import_backend(name)
    return names


def import_backend(name):
    """The backend's package, imported now; a missing one is a one-line ValueError."""
    # torch.utils.tensorboard is in torch, but needs the tensorboard package: import that first,
    # so that the message names what to install.
    packages = {"wandb": ["wandb"], "trackio": ["trackio"], "tensorboard": ["tensorboard", "torch.utils.tensorboard"]}
    try:
        for package in packages[name]:
            module = importlib.import_module(package)
        return module  # the last: the one with the API (torch.utils.tensorboard for tensorboard)
    except ImportError as e:
        raise ValueError(f"--report-to {name} needs the {name} package: pip install {name} "
                         f"(or pip install -e '.[tracking]')") from e


def one_line(error):
    text = " ".join(str(error).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def scalars(row):
    """The numeric values of a metrics.jsonl row, without "step" (the x axis) and "time" (seconds
    since the loop started): every tracker stamps its own wall time, and under wandb, which keeps
    one value per key and step, the evaluation row's time would overwrite its step's."""
    return {key: float(value) for key, value in row.items()
            if key not in ("step", "time") and isinstance(value, numbers.Real)}


# ---------------------------------------- the tracker: what the loop holds; a failing backend never stops the run


class Tracker:
    """Forwards each call to every backend still working (none: report_to "none", or a rank other
    than 0); a backend that raises is dropped with one warning (module docstring)."""

    def __init__(self, backends):
        self.backends = list(backends)

    def log(self, row, step):
        values = scalars(row)
        if values:
            self._call("log", values, step)

    def log_completions(self, step, records):
        if records:
            rows = [[record.get(column) for column in COMPLETION_COLUMNS] for record in records]
            self._call("log_completions", step, rows)

    def finish(self):
        self._call("finish")
        self.backends = []

    def _call(self, method, *args):
        for backend in list(self.backends):
            try:
                getattr(backend, method)(*args)
            except Exception as e:
                self.backends.remove(backend)
                tqdm.write(f"warning: --report-to {backend.name}: {method} failed ({type(e).__name__}: "
                           f"{one_line(e)}); no more reporting to it, metrics.jsonl goes on")

# ---------------------------------------- the backends: each one a few calls of its package's own API


class LoggerBackend:
    """wandb or trackio: the same init / log / Table / finish calls of the package's own API.
    trackio uses no space_id (its local SQLite store, no network or account) and keeps "the
    current run" itself, so its module-level log/finish are the calls to use."""

    def __init__(self, name, run_name, project, out_dir, config):
        self.name, self.package = name, import_backend(name)
        if name == "wandb":
            mode = None if os.environ.get("WANDB_MODE") else ("online" if wandb_api_key_found() else "offline")
            os.makedirs(out_dir, exist_ok=True)  # wandb writes OUT_DIR/wandb, but only into a folder that exists
            self.run = self.package.init(project=project, name=run_name, config=config, dir=out_dir, mode=mode)
        else:
            self.package.init(project=project, name=run_name, config=config)
            self.run = self.package

    def log(self, values, step):
        self.run.log(values, step=step)

    def log_completions(self, step, rows):
        self.run.log({"completions": self.package.Table(columns=list(COMPLETION_COLUMNS), data=rows)}, step=step)

    def finish(self):
        self.run.finish()


def wandb_api_key_found():
    """Whether wandb has a key to log in with: WANDB_API_KEY, or the ~/.netrc entry for its host
    that `wandb login` writes. (Read here with the standard library, not wandb's internals.)"""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):  # no ~/.netrc, or one wandb cannot read either
        return False


class TensorBoardBackend:
    def __init__(self, name, run_name, project, out_dir, config):
        self.name = name
        # One folder per run name, so `tensorboard --logdir` over several out_dirs (or runs that
        # share one out_dir under different --run-name) shows them side by side.
        self.log_dir = os.path.join(out_dir, "tensorboard", run_name)
        self.writer = import_backend("tensorboard").SummaryWriter(self.log_dir, flush_secs=30)
        self.writer.add_text("config", code_block(json.dumps(config, indent=2, default=str)), 0)

    def log(self, values, step):
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def log_completions(self, step, rows):
        # TensorBoard's text tab renders markdown: one heading per completion, the reply verbatim.
        parts = []
        for kind, variant, answer, response, correct in rows:
            verdict = "correct" if correct else "wrong"
            parts.append(f"**{kind} {variant}**, gold `{answer}`, {verdict}\n\n{code_block(str(response))}")
        self.writer.add_text("completions", "\n\n".join(parts), step)
        self.writer.flush()  # an evaluation is rare and worth seeing at once

    def finish(self):
        self.writer.close()


def code_block(text):
    """Markdown code block by indentation (a reply may itself contain ``` fences)."""
    return "\n".join("    " + line for line in text.splitlines() or [""])


BACKENDS = {"wandb": LoggerBackend, "trackio": LoggerBackend, "tensorboard": TensorBoardBackend}  # with "none"

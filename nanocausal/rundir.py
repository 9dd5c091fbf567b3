"""A run's out-dir: one process writes it at a time, nothing in it is followed through a symlink,
nothing is created or cleared before the run is known to be able to start, a resumed run must
match its checkpoint, a checkpoint whose weights diverged is moved aside. training.start_run
calls check() before anything loads, training.train claim() once the trainer has built
everything, and release() when the loop ends.

The lock is an exclusive fcntl.flock on out_dir/nanocausal.lock, which holds the holder's pid:
the kernel drops it when the process ends, however it ends, so a crash leaves no stale lock.
"""
import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import asdict

from nanocausal import checkpoint, cli

LOCK_FILE = "nanocausal.lock"
_held = {}  # real path of an out-dir -> the open lock file (this process holds the lock)


def lock(out_dir):
    """Create out_dir if needed and take its lock (the module docstring) until release()."""
    key = os.path.realpath(out_dir)
    if key in _held:
        return
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} exists and is not a folder: choose another output folder")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK_FILE)
    try:  # O_NOFOLLOW: a lock file that is a symlink is refused, not followed
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise ValueError(f"{path} cannot be opened as a lock file (a symlink?): {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ValueError(f"{out_dir} is in use by another process (pid {holder}, holding {path}): wait for it to "
                         f"end or use another out-dir") from None
    os.ftruncate(fd, 0)  # the pid is written only once the lock is ours
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = fd


def release(out_dir):
    fd = _held.pop(os.path.realpath(out_dir), None)
    if fd is not None:
        os.close(fd)  # closing the file drops the flock


def refuse_symlinks(out_dir):
    """One line if anything a run writes in out_dir (metrics.jsonl, the lock file, checkpoint and
    checkpoint-*, .tmp, .old) is a symlink: writing through it would change a file elsewhere."""
    for name in sorted(os.listdir(out_dir)):
        if name in ("metrics.jsonl", LOCK_FILE) or name.startswith("checkpoint"):
            path = os.path.join(out_dir, name)
            if os.path.islink(path):
                raise ValueError(f"{path} is a symlink (to {os.readlink(path)}): a run writes only real files and "
                                 f"folders in its out-dir; replace it with a copy or remove it")


def set_aside_diverged(ckpt_dir, bad_step):
    """ckpt_dir holds the weights of step bad_step, which then gave a non-finite loss: rename it
    ckpt_dir-STEP-diverged (outside --keep's rotation, which counts the names ending in digits)
    and put the newest earlier checkpoint kept by --keep (ckpt_dir-STEP) in its place."""
    if checkpoint.is_complete(ckpt_dir) and checkpoint.saved_step(ckpt_dir) == bad_step:
        aside = f"{ckpt_dir}-{bad_step:06d}-diverged"
        if os.path.isdir(aside):
            shutil.rmtree(aside)
        os.replace(ckpt_dir, aside)
        kept = checkpoint.kept_checkpoints(ckpt_dir)
        if kept:
            os.replace(kept[-1], ckpt_dir)


def resume_rule(config, name):
    """What a resumed run may do with setting `name` (cli.setting's `resume`)."""
    return cli.about(type(config), name).get("resume")


def check(config, ckpt_dir):
    """Rank 0's checks before anything loads: config.model resolves; an existing out_dir is locked
    (lock), holds no symlink, gets an interrupted save finished (checkpoint.recover), and is
    refused if it holds a run unless --resume (with settings that match: check_resume) or
    --overwrite."""
    if not (str(config.model).endswith(".json") and os.path.isfile(config.model)):
        checkpoint.resolve_model(config.model)  # a wrong --model fails before out_dir is touched
    if os.path.isdir(config.out_dir):
        lock(config.out_dir)  # held until train() ends (or the process does)
        refuse_symlinks(config.out_dir)
        checkpoint.recover(ckpt_dir)
    if config.resume and not os.path.isdir(ckpt_dir):
        print(f"--resume: no checkpoint in {config.out_dir} yet, starting from step 0")
        config.resume = False
    elif config.resume:
        check_resume(config, ckpt_dir)
    elif (os.path.isdir(ckpt_dir) or os.path.isfile(os.path.join(config.out_dir, "metrics.jsonl"))) and \
            not config.overwrite:
        raise ValueError(f"{config.out_dir} already holds a run (checkpoint/ or metrics.jsonl): pass --resume to "
                         f"continue it or --overwrite to start again")


def claim(config, ckpt_dir):
    """Rank 0, at the start of train(): create and lock out_dir, and for --overwrite (only now
    that the trainer has loaded its model and data) delete the earlier run."""
    lock(config.out_dir)
    refuse_symlinks(config.out_dir)
    # a checkpoint saved since check() (by a process that has ended since) is not overwritten silently;
    # --resume that found no checkpoint starts again, metrics.jsonl included
    if not config.resume and os.path.isdir(ckpt_dir) and not config.overwrite:
        raise ValueError(f"{config.out_dir} already holds a run: pass --resume or --overwrite")
    if not config.resume and config.overwrite:
        for name in os.listdir(config.out_dir):
            if name == "checkpoint" or name.startswith("checkpoint-") or name == "metrics.jsonl":
                path = os.path.join(config.out_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def check_resume(config, ckpt_dir):
    """Refuse, before anything loads, to resume with settings that change the run (one line naming
    each; --allow-changed-args lets them through) or that cannot change at all: LoRA's (the
    checkpoint is an adapter folder or it is not) and the algorithm (its optimiser groups)."""
    saved = checkpoint.read_trainer_state(ckpt_dir, mmap=True)["trainer_state"]
    changed = changed_settings(saved.get("config", {}), config, saved.get("fingerprints", {}))
    fixed = [k for k in changed if resume_rule(config, k) == "fixed"]
    if fixed:
        raise ValueError(f"--resume: the run in {config.out_dir} has " + ", ".join(
            f"{k} {changed[k][0]!r}, not {changed[k][1]!r}" for k in fixed) + ": LoRA settings and the algorithm "
            "cannot change on resume (the checkpoint's weights and optimiser are built for them); use another --out-dir")
    if changed and not config.allow_changed_args:
        raise ValueError(f"--resume with other settings than the run in {config.out_dir}: " + ", ".join(
            f"{k} {saved!r} -> {now!r}" + (" (other content)" if resume_rule(config, k) == "content" else "")
            for k, (saved, now) in changed.items()) + " (pass --allow-changed-args "
            "to resume anyway)")


def changed_settings(saved: dict, config, fingerprints: dict):
    """The settings of `config` that differ from the saved run's and change what it computes. A
    path setting (resume="content") is the same when it names the same content: a local path is
    compared by checkpoint.fingerprint with the one saved (none saved: by its resolved path, then
    by content while the old path exists); a hub id by its string."""
    current = asdict(config)

    def same(k):
        if resume_rule(config, k) == "content":
            return same_content(saved[k], current[k], fingerprints.get(k))
        return _plain(saved[k]) == _plain(current[k])
    return {k: (saved[k], current[k]) for k in current if k in saved and resume_rule(config, k) != "free" and not same(k)}


def same_content(saved, now, saved_fingerprint):
    if saved is None or now is None or not os.path.exists(os.path.expanduser(now)):
        return saved == now  # unset, or a hub id
    if saved_fingerprint is None:
        if os.path.realpath(os.path.expanduser(saved)) == os.path.realpath(os.path.expanduser(now)):
            return True
        if not os.path.exists(os.path.expanduser(saved)):
            return False
        saved_fingerprint = checkpoint.fingerprint(saved)
    return checkpoint.fingerprint(now) == saved_fingerprint


def path_fingerprints(config):
    """{setting: checkpoint.fingerprint} of the path settings naming local files or folders, saved
    with every checkpoint (hashed once per run start: about a second per GB)."""
    current = asdict(config)
    return {k: checkpoint.fingerprint(current[k]) for k in current
            if resume_rule(config, k) == "content" and current[k] and os.path.exists(os.path.expanduser(current[k]))}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def keep_metrics_until(path, step):
    """On resume, drop the log lines of steps after the checkpoint (they will be run again). The
    kept lines go to a new file that then replaces the log, so a kill here loses no line."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a killed run, cut mid-write
            if not isinstance(row, dict) or row.get("step", 0) <= step:  # (not ours to judge: kept)
                kept.append(line)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".metrics-")  # O_EXCL: no symlink
    os.chmod(tmp, os.stat(path).st_mode & 0o777)
    with os.fdopen(fd, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def good_checkpoint(ckpt_dir):
    if checkpoint.is_complete(ckpt_dir):
        return f"the last good checkpoint is {ckpt_dir} (step {checkpoint.saved_step(ckpt_dir)}; --resume continues from it)"
    return f"no good checkpoint remains in {os.path.dirname(ckpt_dir) or '.'} (start again with --overwrite)"

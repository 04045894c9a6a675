"""python -m mwmae.finetune --config configs/tag.py[:VARIANT] --workdir DIR [--config.key=value]

Fine-tunes or probes an encoder (``--config.init_from``: an artifact, an original-format
checkpoint folder or a pretraining workdir) on labelled shards. The flags, the multi-host
options and the exit status are the trainer's; ``--help`` lists the flags (exit 0).
"""

from mwmae.train import __main__ as trainer_cli


def run() -> None:
    from mwmae.finetune.tagging import Tagging

    trainer_cli.run(Tagging, __doc__)


if __name__ == "__main__":
    run()

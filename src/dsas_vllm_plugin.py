"""vLLM's entry point into dsas (group `vllm.general_plugins`).

A top-level module on purpose: vLLM calls every installed general plugin in every process, and importing the
`dsas` package pulls torch, transformers and the whole library. Here nothing is imported and nothing is patched
unless `DSAS_STEERERS` is set, so a vLLM user who merely has dsas installed pays nothing.
"""

import os

ENV = "DSAS_STEERERS"


def register() -> None:
    """Install dsas serving when the operator named steerers in $DSAS_STEERERS; otherwise do nothing."""
    if not os.environ.get(ENV, "").strip():
        return
    from dsas.serving.plugin import install

    install()

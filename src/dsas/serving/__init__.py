"""Serving steered models inside a stock vLLM server (general plugin, no fork).

Operator side: `DSAS_STEERERS="tox=runs/tox,pear=runs/pear" vllm serve <model>` (or `dsas serve`) loads the
named steerers when the model loads, checks each against the served model and installs one `dsas::steer`
custom op per steered site. Request side: `SamplingParams(extra_args={"dsas_steerer": "tox",
"dsas_strength": 2.0})`, or the same flat keys in the OpenAI server's `vllm_xargs`. See docs/serving.md.

`dsas.serving.spec` (parsing, validation) and `dsas.serving.op` (the op) import no vLLM; `dsas.serving.plugin`
is the vLLM glue.
"""

from dsas.serving.sites import SUPPORTED_ARCHITECTURES, vllm_site_name
from dsas.serving.spec import KEY_STEERER, KEY_STRENGTH, RequestSteering, parse_request, parse_steerers

__all__ = [
    "KEY_STEERER",
    "KEY_STRENGTH",
    "SUPPORTED_ARCHITECTURES",
    "RequestSteering",
    "parse_request",
    "parse_steerers",
    "vllm_site_name",
]

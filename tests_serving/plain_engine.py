"""A vLLM engine as a user without dsas steering has it: run in a fresh process with DSAS_STEERERS unset.

argv: a JSON file {"checkpoint", "prompts": [[token ids]], "max_tokens"}; prints one JSON line: the greedy
tokens and their logprobs per prompt, which dsas modules got imported, and whether vLLM's classes are patched."""

import json
import sys
from pathlib import Path

if __name__ == "__main__":
    job = json.loads(Path(sys.argv[1]).read_text())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    llm = LLM(model=job["checkpoint"], **job["engine"])
    sp = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, ignore_eos=True, logprobs=1)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], sp, use_tqdm=False)
    patched = {
        f.__qualname__: f.__module__
        for f in (
            CPUModelRunner.load_model,
            CPUModelRunner._prepare_inputs,
            InputProcessor._validate_params,
            InputProcessor.process_inputs,
        )
    }
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "logprobs": [
            [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)]
            for o in outs
        ],
        "dsas_modules": sorted(m for m in sys.modules if m == "dsas" or m.startswith("dsas.")),
        "entry_point_ran": "dsas_vllm_plugin" in sys.modules,
        "method_modules": patched,
    }
    print("RESULT " + json.dumps(result), flush=True)

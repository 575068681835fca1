"""GPU-only: the CUDA-graph (torch.compile reduce-overhead) decode step gives the eager engine's tokens."""

import pytest
import torch

from lmforge.inference import Engine, SamplingParams

from .helpers import prompts, tiny_model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_decode_equals_eager():
    model = tiny_model("gqa", dtype=torch.float32).cuda()
    ps = prompts([3, 9, 5])
    sp = SamplingParams(max_tokens=20, temperature=0)
    eager = Engine(model, max_batch=4, max_len=40).generate(ps, sp)
    compiled = Engine(model, max_batch=4, max_len=40, compile=True)
    assert compiled.compiled
    assert [o[0].token_ids for o in compiled.generate(ps, sp)] == [o[0].token_ids for o in eager]

"""`lmforge interop export-hf|import-hf`: convert between lmforge model directories and HF checkpoints.

An lmforge model directory is what training writes (`model.safetensors` + `model_config.json`, e.g.
`runs/x/checkpoints/step_1000`); a HF directory is `config.json` + `model.safetensors`.
Tokenizer files are the tokenizer stage's (`lmforge tokenizer`), not converted here.
"""

from __future__ import annotations

from lmforge.cli_support import add_stage

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def register(sub) -> None:
    verbs = add_stage(sub, "interop", "convert models to and from Hugging Face checkpoints")
    p = verbs.add_parser("export-hf", help="lmforge model dir -> HF Llama/Qwen2/Qwen3/Mistral/Mixtral dir")
    p.add_argument("--model", required=True, help="lmforge model directory (model_config.json + model.safetensors)")
    p.add_argument("--out", required=True, help="HF checkpoint directory to write")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="tensor dtype (default: as stored)")
    p.set_defaults(func=cmd_export)
    p = verbs.add_parser("import-hf", help="HF checkpoint dir -> lmforge model dir")
    p.add_argument("--hf", required=True, help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="lmforge model directory to write")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="tensor dtype to store")
    p.set_defaults(func=cmd_import)


def cmd_export(args) -> int:
    import torch

    from lmforge.interop.hf import export_hf
    from lmforge.model.checkpoint import load_model

    model, _ = load_model(args.model)
    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
    export_hf(model, args.out, dtype=dtype)
    print(f"wrote {args.out} ({model.cfg.n_layers} layers, {sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0


def cmd_import(args) -> int:
    import torch

    from lmforge.interop.hf import import_hf
    from lmforge.io import atomic_dir
    from lmforge.model.checkpoint import save_model

    model = import_hf(args.hf, dtype=getattr(torch, _DTYPES[args.dtype]))
    with atomic_dir(args.out) as tmp:
        save_model(tmp, model, model.cfg)
    print(f"wrote {args.out} ({model.cfg.n_layers} layers, {sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0

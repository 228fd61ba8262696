"""A tiny transformers Mixtral (built from a config: no download), compiled with ``backend="moe_fuser"``.

transformers v5 builds Mixtral's experts through ``@use_experts_implementation`` (stacked ``gate_up_proj`` /
``down_proj``, ``grouped_mm`` by default for a whole ``*ForCausalLM``); moe_fuser's ``transformers`` pattern
family recognises each layer's block in the captured graph and replaces it by the fused op. The model code is
not touched.

Prints ``moe_fuser.explain`` (one row per MoE layer), checks logits and a training step against eager, and times
the forward of eager, ``torch.compile`` (inductor) and ``torch.compile(backend="moe_fuser")``.

    python examples/hf_mixtral.py [--layers 2] [--hidden 256] [--experts 8] [--tokens 256] [--draw mixtral.svg]
                                  [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import moe_fuser


def build(layers: int, hidden: int, experts: int, top_k: int, dtype: torch.dtype):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                        num_experts_per_tok=top_k, max_position_embeddings=4096)
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg).to(dtype)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def _median_ms(fn, ids, iters: int) -> float:
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    with torch.no_grad():
        fn(input_ids=ids)
        times = []
        for _ in range(iters):
            sync()
            t0 = time.perf_counter()
            fn(input_ids=ids)
            sync()
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128, help="sequence length")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (the fused op then runs as Triton kernels)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--inner", default="inductor", choices=("inductor", "aot_eager", "eager"),
                   help="moe_fuser's inner compiler (default inductor)")
    p.add_argument("--mode", default=None, help="torch.compile mode of both compiled columns (e.g. reduce-overhead: "
                                                "CUDA graphs; with the default inner compiler only)")
    p.add_argument("--draw", default=None, help="render the fused regions before/after (.svg or .png)")
    args = p.parse_args(argv)
    if args.mode and args.inner != "inductor":
        p.error("--mode applies to the inductor inner compiler; drop --inner")
    dtype = getattr(torch, args.dtype)
    model = build(args.layers, args.hidden, args.experts, args.top_k, dtype).to(args.device).eval()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens), device=args.device)

    report = moe_fuser.explain(model, input_ids=ids)
    print(report)
    if args.draw:
        print(f"drawn: {report.draw(args.draw)}")

    # torch.compile takes a mode or options, not both; a mode goes to moe_fuser's inner inductor
    how = {"mode": args.mode} if args.mode else {"options": {"inner": args.inner}}
    fused = torch.compile(model, backend="moe_fuser", **how)
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, fused(input_ids=ids).logits
    err = _rel_err(got, want)
    print(f"\nlogits, fused vs eager: relative error {err:.1e}")

    # One training step through the compiled model: the loss and every gradient match eager.
    model.train()
    train = torch.compile(model, backend="moe_fuser", options={"inner": "aot_eager"})
    grads = []
    for fn in (model, train):
        model.zero_grad(set_to_none=True)
        fn(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten().double() for p in model.parameters() if p.grad is not None]))
    grad_err = _rel_err(grads[1], grads[0])
    print(f"training step, fused vs eager: relative gradient error {grad_err:.1e}")
    model.eval()

    rows = {}
    if not args.no_timing:
        rows = {"eager": _median_ms(model, ids, args.iters)}
        fused_ms = _median_ms(fused, ids, args.iters)
        # dynamo keeps compiled code per function, not per torch.compile call: after a reset the inductor
        # column compiles its own code instead of finding (and running) moe_fuser's
        torch._dynamo.reset()
        inductor = torch.compile(model, mode=args.mode)
        rows["torch.compile (inductor)"] = _median_ms(inductor, ids, args.iters)
        with torch.no_grad():  # the yardstick for the error above: rounding alone, without moe_fuser
            print(f"logits, torch.compile (inductor) vs eager: relative error "
                  f"{_rel_err(inductor(input_ids=ids).logits, want):.1e}")
        rows["torch.compile (moe_fuser)"] = fused_ms
        print(f"\nforward, {args.batch}x{args.tokens} tokens, {args.dtype}, {args.device}, "
              f"mode {args.mode or 'default'}, median of {args.iters}:")
        for name, ms in rows.items():
            print(f"  {name:<27} {ms:9.2f} ms   {rows['eager'] / ms:5.2f}x vs eager")
    return {"report": report, "error": err, "grad_error": grad_err, "ms": rows}


if __name__ == "__main__":
    main()

"""More transformers MoE models than the five families test_transformers_experts.py checks spec by spec: each is built
from a tiny config (one generic shrink), and every MoE layer fuses and trains eager-equal.

Most MoE models in transformers 5 route their experts through ``integrations/moe.py``, so they differ in the router
and around the experts (shared experts, gates, dense first layers). A model whose config the installed transformers
does not have, or that does not run from the tiny config in eager (another transformers version may want other
fields), is skipped with the reason; the fused count is each model's MoE layers out of two (AFMoE, ERNIE-4.5,
HY-V3/V4, Laguna and glm4_moe_lite keep their first layer dense by default). PhiMoE's router samples experts in
training (Gumbel noise, which compiled code draws differently from eager), so it runs in eval mode: the router
stays as written (external) and the experts fuse. DeepSeek-V4's experts clamp gate and up (``swiglu_limit``,
ExpertSpec ``limit``); its sqrt-softplus router stays as written. The inner compiler is aot_eager: the fusion is
the same as under inductor (which the family tests use), at a fraction of the compile time.
"""

import pytest
import torch
import transformers

import moe_fuser
from tiny_hf import TOL, randomize, rel_err, train_step

SHRINK = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=2, head_dim=16, vocab_size=64, max_position_embeddings=64,
              num_experts=8, n_routed_experts=8, num_local_experts=8, num_experts_per_tok=2, first_k_dense_replace=0,
              shared_expert_intermediate_size=40, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8)
# Per-model settings the generic shrink cannot guess. DeepSeek-V4: its own attention sizes, and learned routers in
# both layers (a hash layer's token-to-expert table is an all-zero buffer here: constant routing weights, so its
# router gets no gradient worth comparing). Its clamp limit is made small enough to clamp.
# DeepSeek sparse attention (DeepSeek-V3.2, GLM-5, HY-V4): MLA plus a lightning indexer.
DSA = dict(MLA, q_lora_rank=16, qk_head_dim=16, index_topk=4, index_head_dim=16,
           index_n_heads=2, n_group=2, topk_group=1)
# Hybrid models (linear attention or Mamba next to attention) get attention-only layers: the MoE is what is
# tested, and the linear-attention fallbacks are slow.
ATTENTION = dict(layer_types=["full_attention", "full_attention"])
OVERRIDES = {"deepseek_v4": dict(q_lora_rank=16, o_lora_rank=16, o_groups=2, index_n_heads=2, index_head_dim=16,
                                 index_topk=8, qk_rope_head_dim=8, head_dim=16, mlp_layer_types=["moe", "moe"],
                                 swiglu_limit=1.0),
             "deepseek_v32": DSA, "glm_moe_dsa": DSA, "hy_v4": DSA,
             "qwen3_next": ATTENTION,
             "qwen3_5_moe_text": ATTENTION,
             "kimi_linear": dict(ATTENTION, mlp_layer_types=["sparse", "sparse"]),
             "bailing_hybrid": dict(ATTENTION, mlp_layer_types=["sparse", "sparse"], n_group=2, topk_group=1),
             "lfm2_moe": dict(ATTENTION, num_dense_layers=0),
             "granitemoehybrid": dict(ATTENTION, mamba_n_heads=4, mamba_d_head=16, mamba_expand=2),
             "beam": dict(ATTENTION, mlp_layer_types=["sparse", "sparse"], n_group=2, topk_group=1),
             "jamba": dict(attn_layer_period=1, attn_layer_offset=0, expert_layer_period=1, expert_layer_offset=0),
             "flint": dict(mlp_only_layers=[])}

IDS = (2, 7)   # batch, tokens
# DeepSeek-V4's hyper-connection head (hc_head.*) reaches the loss through 20 Sinkhorn iterations: a reassociated
# sum in the layer moves its gradients by ~1e-4 relative (plain inductor's differ from eager by 4e-5 to 1e-4).
GRAD_TOL = {"deepseek_v4": 1e-3}

# model_type: MoE layers fused out of two
ZOO = {"qwen3_moe": 2, "olmoe": 2, "granitemoeshared": 2, "deepseek_v2": 2, "glm4_moe": 2, "afmoe": 1,
       "ernie4_5_moe": 1, "hunyuan_v1_moe": 2, "minimax": 2, "cohere2_moe": 2, "phimoe": 2, "deepseek_v4": 2,
       "qwen3_next": 2, "qwen3_5_moe_text": 2, "kimi_linear": 2, "bailing_hybrid": 2, "lfm2_moe": 2, "jamba": 2,
       "granitemoehybrid": 2, "deepseek_v32": 2, "glm_moe_dsa": 2, "hy_v4": 1,
       "beam": 2, "exaone_moe": 2, "flex_olmo": 2, "solar_open": 2, "mellum": 2, "minimax_m2": 2, "laguna": 1,
       "kolibri1": 2, "hy_v3": 1, "granitemoe": 2, "granitemoe_swa": 2, "glm4_moe_lite": 1, "llama4_text": 2,
       "sarvam_moe": 2, "sarvam_mla": 2, "inkling_text": 2, "flint": 2, "jetmoe": 2}


# Text backbones of vision-language models (no causal-LM head of their own): model_type -> MoE layers fused.
BACKBONES = {"qwen3_vl_moe_text": 2, "mistral_large4_text": 2, "minimax_m3_vl_text": 2}


def tiny_model(model_type: str, auto=transformers.AutoModelForCausalLM) -> torch.nn.Module:
    if model_type not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    cls = transformers.CONFIG_MAPPING[model_type]
    default = cls()
    kw = {k: v for k, v in SHRINK.items() if hasattr(default, k)}
    if hasattr(default, "kv_lora_rank"):   # multi-head latent attention (DeepSeek-V2 style)
        kw.update(MLA)
    kw.update({k: v for k, v in OVERRIDES.get(model_type, {}).items() if hasattr(default, k)})
    torch.manual_seed(0)
    model = randomize(auto.from_config(cls(**kw)))
    try:   # the shrink is written against one transformers; another may want other fields
        model(torch.randint(0, 64, IDS))
    except Exception as exc:  # noqa: BLE001 - reported in the skip
        pytest.skip(f"transformers {transformers.__version__}'s {model_type} does not run from the tiny config "
                    f"in eager: {type(exc).__name__}: {str(exc)[:120]}")
    return model


@pytest.mark.parametrize("model_type", sorted(ZOO))
def test_model_fuses_and_trains_eager_equal(model_type):
    model = tiny_model(model_type).train(model_type != "phimoe")
    ids = torch.randint(0, 64, IDS)
    report = moe_fuser.explain(model, input_ids=ids)
    if report.num_fused == 0 and any("sentinel" in r.reason for r in report.rejected):
        pytest.skip(f"transformers {transformers.__version__} masks expert-parallel sentinels in every graph; behind "
                    "a router left as written that is refused (test_transformers_experts checks the refusal)")
    assert report.num_fused == ZOO[model_type], report
    fused = {r.module_path for r in report.fused}   # and no other pattern's failed candidate in a fused block
    assert not [r for r in report.rejected if r.family == "transformers" or r.module_path in fused], report
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": "aot_eager"})
    errs = train_step(model, compiled, ids)
    grads = errs.pop("grads")
    assert max(errs.values()) <= TOL[torch.float32] and grads <= GRAD_TOL.get(model_type, TOL[torch.float32]), \
        (errs, grads)


@pytest.mark.parametrize("model_type", sorted(BACKBONES))
def test_text_backbone_fuses_and_trains_eager_equal(model_type):
    """The text models inside vision-language MoE models (Qwen3-VL-MoE, Mistral-Large-4; MiniMax-M3: GPT-OSS's
    clamped SwiGLU on concatenated gate/up halves), as bare backbones: fused, forward and gradients eager-equal."""
    model = tiny_model(model_type, transformers.AutoModel).train()
    ids = torch.randint(0, 64, IDS)
    report = moe_fuser.explain(model, input_ids=ids)
    assert report.num_fused == BACKBONES[model_type], report
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe_fuser", options={"inner": "aot_eager"})
    results = []
    for fn in (model, compiled):
        model.zero_grad(set_to_none=True)
        hidden = fn(ids).last_hidden_state
        hidden.float().pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((hidden.detach(), grads))
    (want, g_want), (got, g_got) = results
    assert g_got.keys() == g_want.keys()
    assert rel_err(got, want) <= TOL[torch.float32]
    assert max(rel_err(g_got[n], g_want[n]) for n in g_want) <= TOL[torch.float32]


def test_post_expert_norm_is_refused_with_the_reason():
    """Muse Spark normalises each expert's output (an RMSNorm, transformers' has_post_expert_norm) before the
    routing weight: the op has no such norm, so its experts stay as written, explain says why, eager-equal."""
    model = tiny_model("muse_spark_text", transformers.AutoModel).eval()
    ids = torch.randint(0, 64, IDS)
    report = moe_fuser.explain(model, input_ids=ids)
    assert report.num_fused == 0
    assert any("post-expert norm" in r.reason for r in report.rejected), report.rejected
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend="moe_fuser", options={"inner": "aot_eager"})(ids).last_hidden_state
        want = model(ids).last_hidden_state
    assert rel_err(got, want) <= TOL[torch.float32]


def test_gate_computed_in_fp32_inside_a_bf16_model_is_refused():
    """Beam's gate runs ``act(gate.float()) * up.float()``: a no-op in an fp32 model (fused above), a precision
    change in a bf16 one, where the fused op would round differently: refused with the reason, nothing fused, the
    compiled model equals eager."""
    model = tiny_model("beam").to(torch.bfloat16).eval()
    ids = torch.randint(0, 64, IDS)
    report = moe_fuser.explain(model, input_ids=ids)
    assert report.num_fused == 0
    assert any("cast from torch.bfloat16 to torch.float32" in r.reason for r in report.rejected), report
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend="moe_fuser", options={"inner": "aot_eager"})(ids).logits
        want = model(ids).logits
    assert rel_err(got, want) <= TOL[torch.bfloat16]

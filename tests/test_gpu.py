"""GPU checks (skipped without CUDA): the parity fixtures on the GPU in float32, and the fast bf16
paths (varlen kernel, cuDNN for long inference segments, the graphed varlen decode) against the
plain paths, with their max relative errors printed (`pytest -s`)."""

import dataclasses

import pytest
import torch
from bagel_remote import attention_bagel, kernels_bagel, layers_bagel, modeling_bagel, modeling_siglip_navit, ops_bagel
from bagel_remote.attention_bagel import AttentionPlan, TokenRoute
from bagel_remote.configuration_bagel import BagelConfig
from bagel_remote.modeling_bagel import BagelForUnifiedMultimodal
from bagel_remote.state_dict_adapter import load_bagel_checkpoint_state_dict
from conftest import assert_close
from torch.nn.attention import SDPBackend, sdpa_kernel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _special_ids(parity):
    from bagel_remote.contexts_bagel import SpecialTokenIds

    ids = parity.meta["special_token_ids"]
    return SpecialTokenIds(ids["bos_token_id"], ids["eos_token_id"], ids["start_of_image"], ids["end_of_image"])


def _parity_model(parity, dtype=torch.float32):
    model = BagelForUnifiedMultimodal(BagelConfig.from_pretrained(parity.checkpoint)).eval()
    model.load_state_dict(load_bagel_checkpoint_state_dict(parity.checkpoint, stage=2), strict=False)
    return model.to("cuda", dtype)


def _train_inputs(parity, dtype=torch.float32):
    inputs = {k: v.cuda() for k, v in parity.case_inputs("train").items()}
    noise = inputs.pop("noise")
    inputs.pop("padded_images")
    meta = parity.meta["cases"]["train"]
    for name in ("padded_latent", "packed_vit_tokens"):
        inputs[name] = inputs[name].to(dtype)
    return dict(
        inputs,
        sequence_length=meta["sequence_length"],
        sample_lens=meta["sample_lens"],
        split_lens=meta["split_lens"],
        attn_modes=meta["attn_modes"],
        patchified_vae_latent_shapes=meta["patchified_vae_latent_shapes"],
        packed_noise=noise,
        output_hidden_states=True,
    )


def _loss_and_grads(model, inputs: dict, autocast: bool = True) -> tuple[torch.Tensor, dict]:
    """One training step's loss (ce + mse means, bf16 autocast unless asked) and the gradients."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(**inputs)
    loss = out["ce"].mean() + out["mse"].mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_train_parity_on_gpu_float32(parity):
    model = _parity_model(parity)
    with torch.no_grad():
        out = model(**_train_inputs(parity))
    for name in ("ce", "mse", "last_hidden_state"):
        assert_close(out[name], parity.expected[f"train.{name}"], 1e-4, name)


def test_bf16_varlen_path_matches_exact_path(parity, monkeypatch):
    """The same bf16 model, with the varlen kernel and with per-segment SDPA on its plain (math)
    backend."""
    if ops_bagel.flash_attn_varlen_func is None and not ops_bagel._TORCH_HAS_VARLEN:
        pytest.skip("no varlen kernel in this torch and no flash-attn")
    model = _parity_model(parity, torch.bfloat16)
    inputs = _train_inputs(parity, torch.bfloat16)
    with torch.no_grad():
        fast = model(**inputs)
        monkeypatch.setattr(
            ops_bagel,
            "_segment_attention",
            lambda q, k, v, group: attention_bagel.sdpa_per_segment(q, k, v, group),
        )
        with sdpa_kernel(SDPBackend.MATH):
            plain = model(**inputs)
    for name in ("ce", "mse", "last_hidden_state"):
        err = ((fast[name].float() - plain[name].float()).abs().max() / plain[name].float().abs().max()).item()
        print(f"bf16 varlen vs exact, {name}: max relative error {err:.2e}")
        assert err < 2e-2, name
    ref = parity.expected["train.last_hidden_state"].cuda()
    err = ((fast["last_hidden_state"].float() - ref).abs().max() / ref.abs().max()).item()
    print(f"bf16 varlen vs float32 reference, last_hidden_state: max relative error {err:.2e}")
    assert err < 5e-2


def test_training_forward_queues_the_vit_without_waiting(parity):
    """With the inputs on the GPU, the work before the ViT (the input checks, attention plan,
    route, the ViT on device offsets bounded by all its tokens) never waits for the GPU, and the ViT
    gives exactly what it gives on host lengths. Wrong GPU lengths are still a clear error."""
    model = _parity_model(parity, torch.bfloat16)
    inputs = _train_inputs(parity, torch.bfloat16)
    vit_args = inputs["packed_vit_tokens"], inputs["packed_vit_position_ids"]
    seqlens, num_vit = inputs["vit_token_seqlens"], inputs["packed_vit_tokens"].shape[0]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        checks = modeling_bagel.check_training_inputs(model, dict(inputs))
        checks += modeling_bagel._timestep_checks(
            inputs["split_lens"],
            inputs["attn_modes"],
            inputs["packed_vae_token_indexes"],
            inputs["packed_timesteps"],
            inputs["mse_loss_indexes"],
        )
        AttentionPlan.from_splits(inputs["split_lens"], inputs["attn_modes"], inputs["sample_lens"], "cuda")
        TokenRoute(inputs["sequence_length"], inputs["packed_vae_token_indexes"])
        on_device = model.model.embed_vit_tokens(*vit_args, seqlens, max_seqlen=num_vit)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    modeling_bagel.raise_failed(checks)  # the pack is valid
    assert len(checks) > 5
    assert torch.equal(on_device, model.model.embed_vit_tokens(*vit_args, seqlens.cpu()))
    wrong = seqlens.clone()
    wrong[0] -= 1
    with pytest.raises(ValueError, match="vit_token_seqlens must"), torch.no_grad():
        model(**dict(inputs, vit_token_seqlens=wrong))


def test_master_weight_gradients_match_autocast(parity, monkeypatch):
    """Float32 weights trained under bf16 autocast. Our Linear (float32 weight gradients from one
    GEMM; q/k/v as one GEMM) against plain autocast, both measured against the
    same step in float32: the loss matches autocast's, and the gradients are as close to float32
    as autocast's are."""
    if not ops_bagel._MM_HAS_OUT_DTYPE:
        pytest.skip("this torch has no mm with a float32 output")
    model = _parity_model(parity).train()
    inputs = dict(_train_inputs(parity), output_hidden_states=False)

    loss, grads = _loss_and_grads(model, inputs)
    exact_loss, exact_grads = _loss_and_grads(model, inputs, autocast=False)
    monkeypatch.setattr(ops_bagel, "_MM_HAS_OUT_DTYPE", False)  # plain nn.Linear
    plain_loss, plain_grads = _loss_and_grads(model, inputs)
    assert ((loss - plain_loss).abs() / plain_loss.abs()).item() < 1e-3
    assert grads.keys() == plain_grads.keys() == exact_grads.keys() and len(grads) > 100
    assert all(g.dtype == torch.float32 for g in grads.values())
    # Weight gradients only: bias gradients that are zero in theory (a key bias: softmax ignores
    # it) are rounding noise of any size.
    weights = [name for name, g in exact_grads.items() if g.dim() == 2]
    error = lambda g, name: ((g[name] - exact_grads[name]).norm() / exact_grads[name].norm()).item()
    ours, autocast = [error(grads, n) for n in weights], [error(plain_grads, n) for n in weights]
    print(
        f"weight gradients vs float32 over {len(weights)} weights: ours max {max(ours):.2e} mean "
        f"{sum(ours) / len(ours):.2e}; autocast max {max(autocast):.2e} mean {sum(autocast) / len(autocast):.2e}"
    )
    assert max(ours) < 5e-2
    assert sum(ours) <= 1.1 * sum(autocast)


def test_activation_checkpointing_same_gradients_on_the_fast_paths(parity):
    """Recomputation through the GPU paths (master-weight GEMMs, Triton kernels, varlen attention,
    routing) under bf16 autocast gives the gradients of the plain backward."""
    model = _parity_model(parity).train()
    inputs = dict(_train_inputs(parity), output_hidden_states=False)

    loss, grads = _loss_and_grads(model, inputs)
    model.gradient_checkpointing_enable()
    loss_ckpt, grads_ckpt = _loss_and_grads(model, inputs)
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 100
    for name in grads:  # atomics in some backward kernels: equal up to summation order
        assert_close(grads_ckpt[name], grads[name].cpu(), 1e-3, name)  # assert_close compares on the CPU


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_kernel_matches_exact_attention(causal):
    torch.manual_seed(0)
    q_lens, k_lens = [5, 130, 1], [9, 130, 64]
    q = torch.randn(sum(q_lens), 8, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sum(k_lens), 2, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    plan = AttentionPlan.segments(q_lens, k_lens, causal)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    fast = ops_bagel.packed_attention(q, k, v, plan)
    exact_inputs = [t.detach().float().requires_grad_() for t in inputs]
    exact = attention_bagel.sdpa_per_segment(*exact_inputs, plan.groups[0])
    assert (fast.float() - exact).abs().max().item() < 2e-2
    grads = torch.autograd.grad(fast.float().square().sum(), inputs)  # the kernel's own backward
    exact_grads = torch.autograd.grad(exact.square().sum(), exact_inputs)
    for name, grad, ref in zip("qkv", grads, exact_grads):
        err = ((grad.float() - ref).abs().max() / ref.abs().max()).item()
        print(f"varlen kernel backward (causal={causal}), d{name}: max relative error {err:.2e}")
        assert err < 2e-2, name


@pytest.mark.parametrize("heads,kv_heads,dim", [(28, 4, 128), (16, 16, 72)])
def test_long_inference_segments_match_exact_attention(heads, kv_heads, dim):
    """Image generation and ViT shapes take the per-segment cuDNN path at inference."""
    torch.manual_seed(0)
    q_lens, k_lens = [1100, 1030], [1130, 1030]
    q = torch.randn(sum(q_lens), heads, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sum(k_lens), kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    plan = AttentionPlan.segments(q_lens, k_lens)
    assert ops_bagel.prefers_cudnn(q, plan.groups[0])
    with torch.no_grad():
        fast = ops_bagel.packed_attention(q, k, v, plan)
    exact = attention_bagel.sdpa_per_segment(q.float(), k.float(), v.float(), plan.groups[0])
    err = ((fast.float() - exact).abs().max() / exact.abs().max()).item()
    print(f"long segments ({heads}/{kv_heads} heads, dim {dim}) vs float32: max relative error {err:.2e}")
    assert err < 2e-2


def test_inference_parity_on_gpu(parity):
    """KV-cached chat and guided text-to-image on the GPU (float32) against the reference, and the
    same run in bf16 through the varlen kernels stays close."""
    from bagel_remote.guidance_bagel import GuidanceParams
    from safetensors.torch import load_file

    special = _special_ids(parity)
    chat, t2i = parity.meta["cases"]["chat"], parity.meta["cases"]["t2i"]
    p = t2i["params"]
    params = GuidanceParams(
        p["num_timesteps"],
        p["timestep_shift"],
        p["cfg_text_scale"],
        p["cfg_img_scale"],
        tuple(p["cfg_interval"]),
        p["cfg_renorm_type"],
        p["cfg_renorm_min"],
    )
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _parity_model(parity, dtype)
        model.vae.load_state_dict(load_file(str(parity.checkpoint / "ae.safetensors")))
        model.vae.to("cuda", dtype)
        context = model.add_vit_images(model.new_context(1), [parity.inputs["chat.image"].cuda()], special)
        context = model.add_text_tokens(context, [chat["prompt_ids"]], special)
        generated, logits = model.generate_text_ids(
            context, special, max_length=chat["max_new_tokens"], return_logits=True
        )
        full = model.add_text_tokens(model.new_context(1), [t2i["prompt_ids"]], special)
        latents = model.generate_latents(
            full,
            model.new_context(1),
            full,
            [tuple(t2i["image_hw"])],
            special,
            params,
            init_noise=[parity.inputs["t2i.init_noise"]],
        )
        results[dtype] = (generated[0], logits[0].float().cpu(), latents[0].float().cpu())
    generated, logits, latents = results[torch.float32]
    assert generated == parity.expected["chat.generated_ids"].tolist()
    assert_close(logits, parity.expected["chat.step_logits"], 1e-4, "step_logits")
    assert_close(latents, parity.expected["t2i.latent_tokens"], 1e-4, "t2i latent tokens")
    _, logits16, latents16 = results[torch.bfloat16]
    for name, fast, exact in (("step_logits", logits16, logits), ("t2i latents", latents16, latents)):
        err = ((fast - exact).abs().max() / exact.abs().max()).item()
        print(f"bf16 varlen vs float32, {name}: max relative error {err:.2e}")
        assert err < 5e-2, name


@pytest.mark.parametrize("kernel", ["decode_attention", "varlen_kernel"])
def test_graphed_decode_matches_plain_decode(parity, monkeypatch, kernel):
    """Two requests of different lengths decoded together through the graphed step (its attention
    the Triton decode attention, or torch's varlen kernel where Triton is missing), against each
    request alone through the plain step (eager, SDPA with a mask, torch's GEMMs and layer norms;
    the q/k norm + rotary stays Triton's), same bf16 model. Alone through our one-row kernels, whose
    folded norms round elsewhere (1% of the
    largest logit here), greedy decoding of this random model picks another token at a near-tie
    by step 3, and the logits part from there: those kernels are checked by
    `test_decoder_decoding_kernels_match_eager`."""

    if kernel == "decode_attention" and kernels_bagel.triton is None:
        pytest.skip("Triton is not installed")
    if kernel == "varlen_kernel":
        monkeypatch.setattr(ops_bagel, "fuses_decode_attention", lambda q, keys, values: False)

    special = _special_ids(parity)
    no_stop = dataclasses.replace(special, eos=-1)  # decode all steps
    model = _parity_model(parity, torch.bfloat16)
    prompt = parity.meta["cases"]["chat"]["prompt_ids"]
    prompts = [prompt, prompt[: len(prompt) // 2]]
    context = model.add_text_tokens(model.new_context(2), prompts, special)
    calls = []
    name = {"decode_attention": "decode_attention_kernel", "varlen_kernel": "varlen_kernel"}[kernel]
    original = getattr(ops_bagel, name)

    def counted(*args):
        if name != "varlen_kernel" or len(args) == 9:  # the decode step's call (with used_k), not a prefill's
            calls.append(1)
        return original(*args)

    monkeypatch.setattr(ops_bagel, name, counted)
    branched, graph_branches = [], ops_bagel._graph_branches
    monkeypatch.setattr(
        ops_bagel,
        "_graph_branches",
        lambda x, layers, streams: branched.append(len(layers)) or graph_branches(x, layers, streams),
    )
    _, fast = model.generate_text_ids(context, no_stop, max_length=8, return_logits=True)
    layers = model.config.text_config.num_hidden_layers
    assert len(calls) == 2 * layers  # the eager step and the capture
    assert branched == [3] * layers  # the capture ran k and v beside q, in every layer
    monkeypatch.setattr(ops_bagel, "has_varlen_kernel", lambda x: False)
    monkeypatch.setattr(ops_bagel, "fuses_decode_attention", lambda q, keys, values: False)
    monkeypatch.setattr(type(model), "_can_graph", lambda self, device: False)
    monkeypatch.setattr(ops_bagel, "fuses_decoding", lambda *args: False)
    for i, ids_i in enumerate(prompts):
        alone = model.add_text_tokens(model.new_context(1), [ids_i], special)
        _, plain = model.generate_text_ids(alone, no_stop, max_length=8, return_logits=True)
        assert fast[i].shape == plain[0].shape == (8, model.config.text_config.vocab_size)
        err = ((fast[i].float() - plain[0].float()).abs().max() / plain[0].float().abs().max()).item()
        print(f"graphed decode ({kernel}) vs plain, request {i}: max relative error {err:.2e}")
        assert err < 2e-2


def test_repeated_decoding_reuses_one_graph_and_keeps_memory_flat(parity):
    """Many calls of one shape (two prompts of one capacity bucket, more calls than the 32 streams
    torch hands out in turn): one CUDA graph, the same ids every time, and not a byte more allocated
    after the 40th call than after the 4th; clearing the pool gives its cache back."""
    special = _special_ids(parity)
    no_stop = dataclasses.replace(special, eos=-1)  # decode all steps
    model = _parity_model(parity, torch.bfloat16)
    prompt = parity.meta["cases"]["chat"]["prompt_ids"]
    contexts = [model.add_text_tokens(model.new_context(1), [p], special) for p in (prompt, prompt[: len(prompt) // 2])]
    run = lambda i: model.generate_text_ids(contexts[i % 2], no_stop, max_length=16)
    first = [run(i) for i in range(4)]
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    for i in range(40):
        assert run(i) == first[i % 2]
    torch.cuda.synchronize()
    pool = model._decode_pool()
    print(
        f"after 44 calls: {pool.captures} capture(s), allocated {torch.cuda.memory_allocated() - allocated:+d} "
        f"bytes since call 4"
    )
    assert pool.captures == 1 and len(pool.runners) == 1
    assert torch.cuda.memory_allocated() == allocated
    cache_bytes = pool.nbytes
    model.clear_generation_cache()
    assert torch.cuda.memory_allocated() <= allocated - cache_bytes
    assert run(0) == first[0] and pool.captures == 2


def test_graphed_decode_with_early_stop_matches_eager(parity, monkeypatch):
    """eos stops read a few steps behind on the GPU (and a batch where one request stops first)
    return what the eager step returns, ids and logits."""
    special = _special_ids(parity)
    model = _parity_model(parity, torch.bfloat16)
    prompt = parity.meta["cases"]["chat"]["prompt_ids"]
    context = model.add_text_tokens(model.new_context(2), [prompt, prompt[: len(prompt) // 2]], special)
    greedy, _ = model.generate_text_ids(context, special, max_length=12, return_logits=True)
    stop = dataclasses.replace(special, eos=greedy[0][4])
    cases = [(special, 12), (special, 3), (stop, 12), (stop, 3)]
    graphed = [model.generate_text_ids(context, s, max_length=n, return_logits=True) for s, n in cases]
    monkeypatch.setattr(type(model), "_can_graph", lambda self, device: False)
    for (ids_g, logits_g), (s, n) in zip(graphed, cases):
        ids_e, logits_e = model.generate_text_ids(context, s, max_length=n, return_logits=True)
        assert ids_g == ids_e
        assert [x.shape for x in logits_g] == [x.shape for x in logits_e]
        for a, b in zip(logits_g, logits_e):
            assert ((a - b).abs().max() / b.abs().max()).item() < 1e-2
    assert graphed[2][0][0] == greedy[0][: greedy[0].index(stop.eos)]  # request 0 stopped at its eos


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_attention_matches_exact_attention(dtype):
    """The Triton decode attention against float32 SDPA over each sequence's used keys, its new
    key and value written into the cache's last used row first (the other rows untouched): BAGEL's
    heads (28 over 4 kv heads, dim 128), one to all keys used, a split's boundary, a batch whose
    lengths differ, and a small head layout."""
    if kernels_bagel.triton is None:
        pytest.skip("Triton is not installed")
    torch.manual_seed(0)
    cases = [(28, 4, 128, 6144, [4951]), (28, 4, 128, 384, [1, 128, 129, 384]), (8, 2, 32, 256, [1, 130, 256])]
    for heads, kv_heads, dim, capacity, used in cases:
        batch = len(used)
        q = torch.randn(batch, heads, dim, device="cuda", dtype=dtype)
        keys, values = (torch.randn(batch * capacity, kv_heads, dim, device="cuda", dtype=dtype) for _ in range(2))
        assert ops_bagel.fuses_decode_attention(q, keys, values)
        assert not ops_bagel.fuses_decode_attention(q.float(), keys.float(), values.float())  # TF32 dots
        new_k, new_v = (torch.randn(batch, kv_heads, dim, device="cuda", dtype=dtype) for _ in range(2))
        expected_keys, expected_values = keys.clone(), values.clone()
        for b, n in enumerate(used):
            expected_keys[b * capacity + n - 1], expected_values[b * capacity + n - 1] = new_k[b], new_v[b]
        out = kernels_bagel.decode_attention(
            q, new_k, new_v, keys, values, torch.tensor(used, dtype=torch.int32, device="cuda"), capacity
        )
        assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
        for b, n in enumerate(used):
            rows = slice(b * capacity, b * capacity + n)
            k, v = (t[rows].float().repeat_interleave(heads // kv_heads, 1).transpose(0, 1) for t in (keys, values))
            exact = torch.nn.functional.scaled_dot_product_attention(q[b].float()[:, None], k, v)[:, 0]
            assert out.dtype == dtype
            assert_close(out[b], exact, rtol=2e-2, name=f"{heads, capacity, n}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decoding_gemv_matches_linear(dtype):
    """The Triton GEMV against float32 F.linear: 1, 3 and 16 rows, with and without bias, K no
    multiple of the block, and the gated (SwiGLU) form against silu(gate) * up; and which inputs
    `Linear` / `Qwen2MLP` route to it."""
    if kernels_bagel.triton is None:
        pytest.skip("Triton is not installed")
    torch.manual_seed(0)
    for rows in (1, 3, 16):
        for n, k in ((3584, 3584), (520, 1000)):
            x = torch.randn(rows, k, device="cuda", dtype=dtype) / k**0.5
            w, up = (torch.randn(n, k, device="cuda", dtype=dtype) for _ in range(2))
            bias = torch.randn(n, device="cuda", dtype=dtype)
            exact = torch.nn.functional.linear(x.float(), w.float(), bias.float())
            assert_close(kernels_bagel.gemv(x, w, bias), exact, rtol=1e-2, name=f"{rows, n, k}")
            gate_up = torch.nn.functional.silu(x.float() @ w.float().T) * (x.float() @ up.float().T)
            assert_close(kernels_bagel.gemv(x, w, up_weight=up), gate_up, rtol=2e-2, name=f"{rows, n, k}")
            added = torch.randn(rows, n, device="cuda", dtype=dtype) * 100  # the residual after the MLP
            assert torch.equal(kernels_bagel.gemv(x, w, add=added), added + kernels_bagel.gemv(x, w))
            if rows > 1:
                continue
            # one row: the RMSNorm folded in, and the residual add before it; x large enough that
            # x * norm weight passes fp16's range (the reference's residual stream reaches thousands),
            # the weights scaled so that the outputs stay inside it
            x = torch.randn(1, k, device="cuda", dtype=dtype) * 3000
            g, residual = torch.rand(k, device="cuda", dtype=dtype) * 4 + 2, torch.randn_like(x) * 100
            w, up = w / k**0.5, up / k**0.5
            normed = _exact_norm(x, g)
            exact = torch.nn.functional.linear(normed, w.float(), bias.float())
            assert_close(kernels_bagel.gemv(x, w, bias, norm=(g, 1e-6)), exact, rtol=1e-2, name=f"{n, k}")
            total, out = kernels_bagel.gemv(x, w, up_weight=up, norm=(g, 1e-6), residual=residual)
            normed = _exact_norm(total, g)
            gate_up = torch.nn.functional.silu(normed @ w.float().T) * (normed @ up.float().T)
            assert torch.equal(total, residual + x)
            assert_close(out, gate_up, rtol=2e-2, name=f"{n, k}")
    with pytest.raises(ValueError, match="one with a norm"):
        kernels_bagel.gemv(torch.ones(2, k, device="cuda", dtype=dtype), w, norm=(g, 1e-6))
    x = torch.ones(2, k, device="cuda", dtype=dtype)
    for add in (
        torch.ones(1, n, device="cuda", dtype=dtype),
        torch.ones(2, n, device="cuda"),
        torch.ones(n, 2, device="cuda", dtype=dtype).T,
    ):
        with pytest.raises(ValueError, match="of the output's shape"):
            kernels_bagel.gemv(x, w, add=add)
    layer = layers_bagel.Linear(64, 48).to("cuda", dtype)
    x = torch.randn(16, 64, device="cuda", dtype=dtype)
    with torch.no_grad():
        assert ops_bagel.fuses_decoding(x, layer.weight)
        assert not ops_bagel.fuses_decoding(torch.cat([x, x[:1]]), layer.weight)  # 17 rows: cuBLAS
        assert not ops_bagel.fuses_decoding(x.float(), layer.weight)  # dtypes differ
        assert torch.equal(layer(x), kernels_bagel.gemv(x, layer.weight, layer.bias))
    assert not ops_bagel.fuses_decoding(x, layer.weight)  # autograd on: cuBLAS


def test_decoding_mlp_under_another_autocast_dtype():
    """bf16 weights under fp16 autocast in inference, 3 rows: gate/up give fp16, so the down
    projection and the residual add after it are torch's (Triton's GEMV takes one dtype), with
    eager's result."""
    if kernels_bagel.triton is None:
        pytest.skip("Triton is not installed")
    config = BagelConfig().text_config
    config.hidden_size, config.intermediate_size = 64, 128
    mlp = modeling_bagel.Qwen2MLP(config).to("cuda", torch.bfloat16)
    norm = modeling_bagel.Qwen2RMSNorm(64, 1e-6).to("cuda", torch.bfloat16)
    x, residual = (torch.randn(3, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        out = mlp.forward_residual(x, norm, residual)
        total = residual + x
        expected = total + mlp(norm(total))
    assert_close(out, expected, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decoding_rms_norm_matches_eager(dtype):
    """The Triton RMSNorm, alone and with the residual add, against float32 eager, at BAGEL's width
    and at one no power of two, one to 16 rows; `Qwen2RMSNorm` gives both forms."""
    if kernels_bagel.triton is None:
        pytest.skip("Triton is not installed")
    from bagel_remote.modeling_bagel import Qwen2RMSNorm

    torch.manual_seed(0)
    for rows, dim in ((1, 3584), (16, 3584), (5, 100)):
        x, residual = (torch.randn(rows, dim, device="cuda", dtype=dtype) for _ in range(2))
        weight = torch.randn(dim, device="cuda", dtype=dtype)
        assert_close(kernels_bagel.rms_norm(x, weight, 1e-6), _exact_norm(x, weight), rtol=1e-2)
        total, normed = kernels_bagel.rms_norm(x, weight, 1e-6, residual=residual)
        assert torch.equal(total, residual + x)
        assert_close(normed, _exact_norm(total, weight), rtol=1e-2)
    norm = Qwen2RMSNorm(100, 1e-6).to("cuda", dtype)
    x, residual = (torch.randn(5, 100, device="cuda", dtype=dtype) for _ in range(2))
    with torch.no_grad():
        assert torch.equal(norm(x, residual=residual)[1], kernels_bagel.rms_norm(x, norm.weight, 1e-6, residual)[1])
    total, normed = norm(x, residual=residual)  # autograd on: torch's ops, the same numbers to rounding
    assert torch.equal(total, residual + x)
    assert_close(normed, _exact_norm(total, norm.weight), rtol=1e-2)


def test_decoder_decoding_kernels_match_eager(parity, monkeypatch):
    """The bf16 decoder on 1 and 5 tokens in inference (Triton GEMVs and norms, the residual add
    after the MLP in the down GEMV; for one token the norms folded into the GEMVs: q/k/v and gate/up
    each one kernel) against the same decoder with autograd on (torch's kernels)."""
    if kernels_bagel.triton is None:
        pytest.skip("Triton is not installed")
    decoder = _parity_model(parity, torch.bfloat16).model.language_model.model
    calls = []
    monkeypatch.setattr(ops_bagel, "gemv", lambda *a, gemv=kernels_bagel.gemv, **kw: calls.append(kw) or gemv(*a, **kw))
    torch.manual_seed(0)
    for n in (1, 5):
        x = torch.randn(n, decoder.config.hidden_size, device="cuda", dtype=torch.bfloat16)
        run = lambda: decoder(x, torch.arange(n, device="cuda"), AttentionPlan.segments([n], [n], True), TokenRoute(n))
        calls.clear()
        with torch.no_grad():
            fast = run()
        folded = decoder.config.num_hidden_layers if n == 1 else 0
        assert sum("norm" in kw for kw in calls) == 4 * folded  # q, k, v and the MLP's gate/up
        assert sum("residual" in kw for kw in calls) == folded
        assert sum("add" in kw for kw in calls) == decoder.config.num_hidden_layers
        assert len(calls) == 6 * decoder.config.num_hidden_layers  # q, k, v, o, gate and up together, down
        plain = run()
        assert_close(fast, plain.float(), rtol=3e-2, name=f"{n} tokens")


def _exact_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.rms_norm(x.float(), weight.shape, weight.float(), 1e-6)


def test_fused_silu_mul_matches_eager():
    """The Triton SwiGLU kernels against eager silu(gate) * up, values and both gradients; on a
    size that is no multiple of the block, and on non-contiguous inputs."""
    if kernels_bagel.triton is None:
        pytest.skip("Triton is not installed")
    torch.manual_seed(0)
    gate = (torch.randn(1000, 3001, device="cuda") * 3).bfloat16().requires_grad_()
    up = torch.randn(1000, 3001, device="cuda", dtype=torch.bfloat16).requires_grad_()
    grad = torch.randn(1000, 3001, device="cuda", dtype=torch.bfloat16)
    fused = kernels_bagel.silu_mul(gate, up)
    eager = torch.nn.functional.silu(gate) * up
    results = {"out": (fused, eager)}
    results.update(
        zip(
            ("d_gate", "d_up"),
            zip(torch.autograd.grad(fused, (gate, up), grad), torch.autograd.grad(eager, (gate, up), grad)),
        )
    )
    for name, (ours, ref) in results.items():
        err = ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        print(f"fused silu*mul vs eager, {name}: max relative error {err:.2e}")
        assert err < 1e-2, name
    strided = kernels_bagel.silu_mul(gate.detach().t(), up.detach().t())
    torch.testing.assert_close(strided, fused.detach().t())


def test_fused_rms_norm_rotary_matches_eager():
    """The Triton q/k RMSNorm + rotary kernels against the eager path (F.rms_norm, then
    apply_rotary) in float32: values and the gradients of x and of the norm weight, for heads
    read out of a wider fused projection (strided tokens) and a row count no multiple of the block."""
    if kernels_bagel.triton is None:
        pytest.skip("Triton is not installed")
    torch.manual_seed(0)
    tokens, heads, dim = 1001, 5, 128
    fused_qkv = torch.randn(tokens, (heads + 3) * dim, device="cuda").bfloat16() * 3
    x = fused_qkv[:, : heads * dim].view(tokens, heads, dim).requires_grad_()  # stride(0) is (heads + 3) * dim
    weight = (1 + 0.3 * torch.randn(dim, device="cuda")).requires_grad_()
    positions = torch.randint(0, 5000, (tokens,), device="cuda")
    cos, sin = (t.bfloat16() for t in layers_bagel.rotary_cos_sin(positions, dim, 1e6))  # as the model has them
    grad = torch.randn(tokens, heads, dim, device="cuda", dtype=torch.bfloat16)
    assert ops_bagel.fuses_rms_norm_rotary(x) and not x.is_contiguous()
    fused = kernels_bagel.rms_norm_rotary(x, weight, 1e-6, cos, sin)
    ours = [fused, *torch.autograd.grad(fused, (x, weight), grad)]
    x32, w32 = x.detach().float().requires_grad_(), weight.detach().clone().requires_grad_()
    eager = kernels_bagel.apply_rotary(torch.nn.functional.rms_norm(x32, (dim,), w32, 1e-6), cos.float(), sin.float())
    ref = [eager, *torch.autograd.grad(eager, (x32, w32), grad.float())]
    for name, a, b in zip(("out", "d_x", "d_weight"), ours, ref):
        assert a.dtype == (torch.float32 if name == "d_weight" else torch.bfloat16), name
        err = ((a.float() - b).abs().max() / b.abs().max()).item()
        print(f"fused rms_norm+rotary vs eager float32, {name}: max relative error {err:.2e}")
        assert err < (5e-3 if name != "d_weight" else 1e-4), name  # bf16 rounding of out and d_x


def test_lora_wrapped_projections_step_aside_from_the_stacked_gemm():
    """Float32 weights trained under autocast take the stacked q/k/v GEMM; once PEFT wraps the
    projections, each wrapper's own forward runs, so the adapters' outputs count."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    attn = modeling_siglip_navit.SiglipAttention(
        modeling_siglip_navit.SiglipVisionConfig(hidden_size=64, num_attention_heads=2, intermediate_size=128)
    ).cuda()
    layers = lambda: (attn.q_proj, attn.k_proj, attn.v_proj)  # noqa: E731
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]), attn)
    for module in layers():
        module.lora_B["default"].weight.data.normal_()  # a non-zero adapter
        module.base_layer.weight.requires_grad_(True)  # the base trains too: the stacked path's case
    x = torch.randn(8, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = ops_bagel.linears(x, layers())
        each = tuple(layer(x) for layer in layers())
    for a, b in zip(fused, each):
        torch.testing.assert_close(a, b)


def test_eager_attention_matches_sdpa_on_the_gpu(parity, monkeypatch):
    """attn_implementation="eager" on the bf16 model: the training forward and the graphed decode
    step run the matmul-softmax attention (no varlen, cuDNN or Triton attention kernel) and agree
    with "sdpa" to bf16 rounding."""
    model = _parity_model(parity, torch.bfloat16)
    inputs = _train_inputs(parity, torch.bfloat16)
    special = _special_ids(parity)
    stop_never = dataclasses.replace(special, eos=-1)  # decode all steps
    prompt = parity.meta["cases"]["chat"]["prompt_ids"]

    def run():
        with torch.no_grad():
            out = model(**inputs)
        context = model.add_text_tokens(model.new_context(1), [prompt], special)
        _, logits = model.generate_text_ids(context, stop_never, max_length=2, return_logits=True)
        return out, logits[0]

    sdpa, sdpa_logits = run()
    model.set_attn_implementation("eager")
    for name in ("decode_attention_kernel", "varlen_kernel", "flash_attn_varlen_func", "sdpa_per_segment"):
        monkeypatch.setattr(ops_bagel, name, lambda *args, name=name, **kw: pytest.fail(f"{name} ran under eager"))
    eager_calls, eager_attention = [], ops_bagel.eager_attention
    monkeypatch.setattr(ops_bagel, "eager_attention", lambda *a: eager_calls.append(1) or eager_attention(*a))
    eager, eager_logits = run()
    assert eager_calls  # the decode step's attention (eager, then captured)
    for name in ("ce", "mse", "last_hidden_state"):
        err = ((eager[name].float() - sdpa[name].float()).abs().max() / sdpa[name].float().abs().max()).item()
        assert err < 2e-2, name
    err = ((eager_logits[0].float() - sdpa_logits[0].float()).abs().max() / sdpa_logits[0].float().abs().max()).item()
    assert err < 3e-2

"""
TRB's blend inside vLLM: rollouts and evaluation decoded by the engine the field serves with, in its own environment
(requirements-vllm.txt). The Hugging Face loop in trb.blended_generate stays the reference; the tests check this
engine against it token for token.

vLLM samples from one model's logits, so the engine runs one model that holds two: BlendedForCausalLM has a student
and a teacher Qwen3 stack, each with its own attention layers (vLLM pages both KV caches under one block table). Its
forward returns both stacks' last hidden states side by side; its compute_logits is trb's token rule on them: both
heads cut to the shared tokenizer range and divided by the temperature, the EOS ids merged (trb.canonicalise_eos),
beta* solved per row (trb.solve_beta) and log mu_beta* returned (trb.blend_logprobs), head rows beyond the tokenizer
at -inf. vLLM then samples at temperature 1 (or greedily), so its tokens follow mu* exactly and its log-probs are
log mu*(token). eps and the temperature are set on the model between requests (WorkerExtension.trb_set_step).
Without a teacher the class is the student alone (no teacher weights, no teacher KV cache): what a policy that never
runs the teacher (OPD) gets. TRB's engine stops running the teacher's stack once the budget is 0 for good.

Weights: the student's reach the engine after every optimizer step through vLLM's in-place reload, followed by a
prefix-cache reset (the cached keys and values are the old student's). Everything runs in the calling process
(VLLM_ENABLE_V1_MULTIPROCESSING=0): no port, no serialization.
"""
import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import torch

import trb
from distill import fast, memory_plan
from distill.config import die

ARCHITECTURE = "TRBBlendForCausalLM"
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: tensors pass by reference


def _qwen3():
    from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
    return Qwen3ForCausalLM


def _model_class():
    """BlendedForCausalLM, defined on first use: its base classes come from vLLM, which the main environment lacks."""
    import torch.nn as nn
    from transformers import Qwen3Config

    Qwen3ForCausalLM = _qwen3()

    class BlendedForCausalLM(nn.Module):
        """A student and (optionally) a teacher Qwen3 stack; compute_logits returns log mu* (module docstring)."""

        def __init__(self, *, vllm_config, prefix=""):
            super().__init__()
            config = vllm_config.model_config.hf_config
            self.config = config
            self.vocab_size = config.trb_vocab_size  # the shared tokenizer range
            self.eos_ids = list(config.trb_eos_ids)
            self.student = Qwen3ForCausalLM(vllm_config=vllm_config.with_hf_config(
                Qwen3Config(**config.trb_student), ["Qwen3ForCausalLM"]), prefix="student")
            self.teacher = None
            if config.trb_teacher:
                self.teacher = Qwen3ForCausalLM(vllm_config=vllm_config.with_hf_config(
                    Qwen3Config(**config.trb_teacher), ["Qwen3ForCausalLM"]), prefix="teacher")
            self.eps, self.tau = 0.0, 1.0
            self.teacher_off = False  # true once the budget is 0 for good: the teacher's stack is not run again

        def embed_input_ids(self, input_ids):
            return self.student.embed_input_ids(input_ids)

        def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
            hidden = self.student(input_ids, positions, intermediate_tensors, inputs_embeds)  # (T, Hs)
            if self.teacher is None or self.teacher_off:
                return hidden
            # Owned before the teacher runs. Under piecewise CUDA graphs each compiled stack hands back its last
            # graph piece's output as a view into vLLM's global graph memory pool, and the teacher's graphs are
            # captured next in that pool: replaying them can overwrite the student's output (vLLM pull request 22282,
            # "module B overwrites the outputs returned by module A"). A copy costs T x Hs, one row per token.
            hidden = hidden.clone()
            return torch.cat([hidden, self.teacher(input_ids, positions)], dim=-1)  # (T, Hs + Ht)

        def _head(self, model, hidden):
            logits = model.compute_logits(hidden)[:, :self.vocab_size].float()  # (T, V)
            return trb.canonicalise_eos(logits / self.tau, self.eos_ids)

        def compute_logits(self, hidden_states):
            hs = self.student.config.hidden_size
            student_logits = self._head(self.student, hidden_states[:, :hs])
            if self.teacher is None or self.teacher_off or self.eps == 0:
                log_mu = torch.log_softmax(student_logits, dim=-1)
            else:
                teacher_logits = self._head(self.teacher, hidden_states[:, hs:])
                beta = trb.solve_beta(student_logits, teacher_logits, self.eps)
                log_mu = trb.blend_logprobs(student_logits, teacher_logits, beta)
            out = log_mu.new_full((log_mu.shape[0], self.config.vocab_size), float("-inf"))
            out[:, :self.vocab_size] = log_mu
            return out

        def load_weights(self, weights):
            """The student's weights from the engine folder (the checkpoint vLLM reads), the teacher's from its own."""
            loaded = {f"student.{name}" for name in self.student.load_weights(weights)}
            if self.teacher is not None:
                teacher_weights = _safetensors(self.config.trb_teacher_path)
                loaded |= {f"teacher.{name}" for name in self.teacher.load_weights(teacher_weights)}
            return loaded

    return BlendedForCausalLM


def _safetensors(folder):
    """(name, tensor) of every .safetensors file in a folder."""
    from safetensors import safe_open
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


class WorkerExtension:
    """Methods vLLM adds to its worker, called by name through LLM.collective_rpc (no serialization in-process)."""

    def trb_set_step(self, eps, tau):
        model = self.model_runner.get_model()
        model.eps, model.tau = float(eps), float(tau)

    def trb_drop_teacher(self):
        self.model_runner.get_model().teacher_off = True

    def trb_load_student(self, named_tensors):
        """Reload the student's weights in place from (HF name, tensor) pairs, consumed one at a time; inside the
        engine's config context, as vLLM's own worker wraps its reload."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.inplace import reload_weights
        model = self.model_runner.get_model()
        with set_current_vllm_config(self.model_runner.vllm_config):
            reload_weights(self.model_runner.vllm_config, model.student, iter(named_tensors), None, True)


def register():
    """Make the architecture known to vLLM (idempotent)."""
    from vllm import ModelRegistry
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, _model_class())


def write_folder(folder, student_dir, teacher_dir, vocab_size, eos_ids):
    """
    The folder vLLM loads: the student's config with this architecture and the pair's settings, and the student's
    weights (linked). teacher_dir None: the student alone.
    """
    folder, student_dir = Path(folder), Path(student_dir)
    folder.mkdir(parents=True, exist_ok=True)
    student = json.loads((student_dir / "config.json").read_text())
    config = dict(student, architectures=[ARCHITECTURE], trb_student=student, trb_vocab_size=int(vocab_size),
                  trb_eos_ids=list(eos_ids), trb_teacher=None, trb_teacher_path=None)
    if teacher_dir is not None:
        config["trb_teacher"] = json.loads((Path(teacher_dir) / "config.json").read_text())
        config["trb_teacher_path"] = str(Path(teacher_dir).resolve())
    for file in student_dir.glob("*.safetensors*"):
        target = folder / file.name
        if target.exists() or target.is_symlink():
            target.unlink()
        target.symlink_to(file.resolve())
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def _full(tensor):
    """A parameter's whole tensor: FSDP2 shards are DTensors (full_tensor all-gathers them, on every rank at once)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def streamed(student, dtype):
    """The student's (HF name, full tensor in dtype) pairs, one at a time: the engine's worker runs in this process
    (collective_rpc hands it this generator by reference), so the bf16 student is never held whole beside the engine.
    A tied head is the embedding: it is sent as the tensor already gathered for it, not gathered again (under FSDP,
    an all-gather of the embedding). vLLM's in-place reload rebuilds each layer's parameters, which unties its own
    head, so the head is still sent."""
    tied = getattr(student.config, "tie_word_embeddings", False)
    embedding = next(f"{name}.weight" for name, module in student.named_modules()
                     if module is student.get_input_embeddings())
    gathered = None
    for name, tensor in student.state_dict().items():
        if tied and name == "lm_head.weight" and gathered is not None:
            yield name, gathered
            continue
        full = _full(tensor).detach().to(dtype)
        if tied and name == embedding:
            gathered = full
        yield name, full


@torch.no_grad()
def save_model(model, folder):
    """config.json and model.safetensors of a Hugging Face model, sharded by FSDP or not (every rank must call it); a
    tied head is left out, as save_pretrained does."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tied = getattr(model.config, "tie_word_embeddings", False)
    state = {name: _full(t).detach().contiguous().cpu() for name, t in model.state_dict().items()
             if not (tied and name == "lm_head.weight")}
    model.config.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _teacher_folder(cfg, teacher, folder):
    """A local folder of the teacher's safetensors: cfg.teacher itself, the hub cache's copy, or one written here."""
    if os.path.isdir(os.path.expanduser(cfg.teacher)):
        return Path(os.path.expanduser(cfg.teacher))
    if cfg.teacher != "synthetic":
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(cfg.teacher, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the hub cache under that name: write it below
            pass
    save_model(teacher, folder / "teacher")
    return folder / "teacher"


def _rollout(input_ids, attention_mask, completions, logprobs, pad_token_id):
    """trb.Rollout of left-padded (B, P) prompts and per-row completion ids with their log mu*: the engine's rollout;
    the teacher's diagnostics are NaN (the trainer computes them from its own forward)."""
    B = input_ids.shape[0]
    N = max([len(c) for c in completions] + [0])
    tokens = input_ids.new_full((B, N), pad_token_id if pad_token_id is not None else 0)
    behavior = torch.zeros(B, N)
    for i, (ids, lps) in enumerate(zip(completions, logprobs)):
        tokens[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        behavior[i, :len(ids)] = torch.tensor(lps, dtype=torch.float32)
    completion_mask = torch.arange(N)[None] < torch.tensor([len(c) for c in completions])[:, None]  # (B, N)
    nan = torch.full((B, N), float("nan"))
    return trb.Rollout(sequences=torch.cat([input_ids, tokens.to(input_ids.device)], dim=1),
                       completion_mask=completion_mask.to(input_ids.device), beta=nan.clone(),
                       behavior_logprobs=behavior, teacher_logprobs=nan.clone(), realised_kl=nan.clone(),
                       teacher_entropy=nan.clone(), replaced=torch.zeros(B, N, dtype=torch.bool))


def request_seed(generator):
    """A request's sampling seed drawn from a torch generator, so that a seeded (and resumed) run reproduces."""
    return int(torch.randint(0, 2 ** 31 - 1, (), generator=generator, device=generator.device))


def request_seeds(seed, requests, n):
    """The seeds of a call's requests, seed + i * n for request i: vLLM samples request i's n completions with seeds
    s_i + j, j < n (vllm/v1/engine/parallel_sampling.py), so these never repeat across a call's requests and samples
    (seed + i would give request i's sample 1 the seed of request i + 1's sample 0: correlated completions)."""
    return [seed + i * n for i in range(requests)]


class Engine:
    """
    The vLLM engine of one run, a decoder with evaluation.HFDecoder's interface: created from the HF student and teacher
    the trainer holds (their weights written to `folder` once), then fed the student's weights after every optimizer
    step (sync). Every call decodes all its prompts at once; vLLM batches them continuously. Its rollouts carry the
    tokens and log mu*(token) only: the trainer recomputes the other diagnostics from its loss forward (visited_sums).
    """
    rollout_diagnostics = False

    def __init__(self, cfg, student, teacher, vocab_size, eos_ids, folder, with_teacher=True, pad_token_id=None,
                 device=None, eager=False):
        register()
        self.cfg, self.vocab_size, self.eos_ids = cfg, int(vocab_size), list(eos_ids)
        self.pad_token_id = pad_token_id
        self.folder = Path(folder)
        # the engine's device: the student's, or (evaluate.py) a GPU that the student, kept on the CPU, never takes
        self.device = torch.device(device) if device is not None else next(student.parameters()).device
        self.dtype = "float32" if self.device.type == "cpu" else "bfloat16"
        self.eager = eager or self.device.type == "cpu"  # eager: no torch.compile, no CUDA graphs (gpu_check's control)
        save_model(student, self.folder / "student")
        self.teacher_dir = _teacher_folder(cfg, teacher, self.folder) if with_teacher else None
        self.teacher_on = with_teacher
        self.llm = self._start()

    def _start(self):
        from vllm import LLM
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cfg.vllm_cpu_kv_cache_gib))
        folder = write_folder(self.folder / "engine", self.folder / "student", self.teacher_dir, self.vocab_size,
                              self.eos_ids)
        cuda = self.device.type == "cuda"
        max_len = self.cfg.max_prompt_tokens + max(self.cfg.max_new_tokens, self.cfg.eval_max_new_tokens)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        # Under torchrun: one engine per rank (tensor-parallel 1) in torchrun's own processes, as data-parallel ranks
        # of vLLM's external launcher; each decodes its own prompts. The ranks do step in lockstep: every engine step
        # all-reduces across them whether any rank has unfinished requests, and a rank whose rows are done runs dummy
        # forwards until all are. So every rank must make the same sequence of engine calls (the trainer's hooks
        # already make every rank decode every step and evaluation), or one would wait in that all-reduce for ever.
        distributed = dict(distributed_executor_backend="external_launcher", data_parallel_size=world) if world > 1 \
            else {}
        # CUDA graphs piecewise, around the compiled decoder stacks and not across the whole forward, so that the
        # forward's Python still decides whether the teacher's stack runs (drop_teacher).
        graphs = dict(compilation_config={"cudagraph_mode": "PIECEWISE"}) if not self.eager and self.teacher_dir \
            else {}
        try:
            return LLM(model=str(folder), skip_tokenizer_init=True, dtype=self.dtype, seed=self.cfg.seed,
                       enforce_eager=self.eager, max_model_len=max_len, enable_sleep_mode=cuda, **graphs,
                       **({"gpu_memory_utilization": self.cfg.vllm_gpu_memory_utilization} if cuda else {}),
                       worker_extension_cls="distill.vllm_engine.WorkerExtension", **distributed)
        except ValueError as error:  # vLLM's refusal when the free memory is short of the fraction asked for
            if "memory utilization" not in str(error):
                raise
            die(f"vllm_gpu_memory_utilization: vLLM cannot start with {self.cfg.vllm_gpu_memory_utilization} of the "
                f"GPU ({str(error).splitlines()[0]}); lower it, or free the memory that something else holds")

    @property
    def has_teacher(self):
        """Whether the engine still runs the teacher."""
        return self.teacher_on

    def drop_teacher(self):
        """The teacher's stack is not run again (the budget is 0 from here on). Its weights stay where they are: a
        restart without them would tear down torchrun's process group with vLLM's own (seen on vLLM 0.32)."""
        if not self.teacher_on:
            return
        self.llm.collective_rpc("trb_drop_teacher")
        self.teacher_on = False

    def close(self):
        """Shuts the engine down now rather than at interpreter exit. Under torchrun vLLM's teardown also closes the
        default process group (torchrun's), so the trainer closes it only if it is still open."""
        self.llm.llm_engine.engine_core.shutdown()

    @torch.no_grad()
    def sync(self, student):
        """The student's current weights into the engine, in place; then the prefix cache is reset (its keys and values
        are the old student's)."""
        dtype = getattr(torch, self.dtype)
        self.llm.collective_rpc("trb_load_student", args=(streamed(student, dtype),))
        self.llm.reset_prefix_cache()

    def sleep(self):
        """Frees the engine's GPU memory while the loss runs (weights to host memory, KV pool dropped)."""
        if self.device.type == "cuda":
            self.llm.sleep(level=1)

    def wake_up(self):
        """The engine's memory back (after the update): the trainer's cached free blocks are returned to the device
        first, or the engine's weights and KV pool would not fit beside them."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            self.llm.wake_up()

    @staticmethod
    def unpadded(input_ids, attention_mask):
        """Token-id lists of a left-padded (B, P) batch: each row's tokens where attention_mask is 1."""
        return [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]

    def generate(self, prompts, *, eps, temperature, max_new_tokens, n=1, seed=0, token_rule=None):
        """Completions of token-id prompts: per prompt, n lists of ids (each ending at its EOS when it stopped) and n
        lists of log mu*(token). temperature 0 is greedy (argmax of mu* at temperature 1), as in blended_generate."""
        from vllm import SamplingParams
        if token_rule is not None:
            raise ValueError("engine: vllm runs the blend (opd, trb, fixed_eps, temperature_warmup, teacher); "
                             "another token rule (skd) needs engine: hf")
        if eps > 0 and not self.has_teacher:
            raise ValueError(f"engine: eps {eps} > 0 needs the teacher, which this engine no longer runs")
        self.llm.collective_rpc("trb_set_step", args=(eps, temperature or 1.0))
        params = [SamplingParams(n=n, temperature=1.0 if temperature else 0.0, max_tokens=max_new_tokens,
                                 stop_token_ids=self.eos_ids, logprobs=0, detokenize=False, seed=request)
                  for request in request_seeds(seed, len(prompts), n)]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        ids = [[list(c.token_ids) for c in out.outputs] for out in outputs]
        logprobs = [[[d[t].logprob for d, t in zip(c.logprobs, c.token_ids)] for c in out.outputs]
                    for out in outputs]
        return ids, logprobs

    def rollouts(self, input_ids, attention_mask, generator=None, max_new_tokens=None, *, eps, temperature,
                 token_rule=None):
        """trb.Rollout of left-padded (B, P) prompts, one completion each up to max_new_tokens (default: the config's),
        as HFDecoder.rollouts decodes them. The requests' seeds are drawn from `generator`, so a seeded (and resumed)
        run reproduces."""
        seed = request_seed(generator) if generator else 0
        prompts = self.unpadded(input_ids, attention_mask)
        ids, logprobs = self.generate(prompts, eps=eps, temperature=temperature, seed=seed, token_rule=token_rule,
                                      max_new_tokens=max_new_tokens or self.cfg.max_new_tokens)
        return _rollout(input_ids, attention_mask, [c[0] for c in ids], [c[0] for c in logprobs], self.pad_token_id)

    def completions(self, prompts, n, temperature, generator=None):
        """n completions of each token-id prompt (the student alone), up to eval_max_new_tokens, in one request."""
        seed = request_seed(generator) if generator else 0
        return self.generate(prompts, eps=0.0, temperature=temperature, max_new_tokens=self.cfg.eval_max_new_tokens,
                             n=n, seed=seed)[0]


def require():
    """Stops with one line where vLLM is not installed (before any model loads)."""
    if importlib.util.find_spec("vllm") is None:
        die("engine: vllm needs the vLLM environment, .venv-vllm (./run.sh --engine=vllm makes it from "
            "requirements-vllm.txt)")


def teacher_needed(cfg, step):
    """Whether any rollout from `step` on runs the teacher (for TRB: until its budget has reached 0 for good)."""
    return any(trb.behavior_needs_teacher(trb.behavior(cfg.method, k, cfg)) for k in range(step, cfg.max_steps))


def start(cfg, student, teacher, vocab_size, eos_ids, pad_token_id, step, rank):
    """The engine of a training run (engine: vllm) from `step` on, with the teacher only while the policy needs it;
    its folder (the student's weights, the teacher's when it has no local folder) is written under out_dir. On a GPU
    it takes the fraction memory_fraction gives, said by rank 0."""
    device = next(student.parameters()).device
    if device.type == "cuda":
        fraction, line = memory_fraction(cfg, student, teacher, torch.cuda.get_device_properties(device).total_memory)
        cfg = dataclasses.replace(cfg, vllm_gpu_memory_utilization=fraction)
        if rank == 0:
            print(line, flush=True)
    return Engine(cfg, student, teacher, vocab_size, eos_ids, Path(cfg.out_dir) / "engine" / f"rank{rank}",
                  with_teacher=teacher_needed(cfg, step), pad_token_id=pad_token_id)


def memory_fraction(cfg, student, teacher, gpu_bytes):
    """(fraction of the GPU for the engine, the line that says where it comes from): vllm_gpu_memory_utilization, or
    where it is 0 what the memory plan (memory_plan.plan at this run's shapes, world size and GPU) leaves beside the
    trainer while the engine is awake, less memory_plan.ENGINE_MARGIN. Stops with one line where the fraction cannot
    hold both models' bf16 weights."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    gpu_gib = round(gpu_bytes / memory_plan.GiB, 1)
    result = memory_plan.plan(cfg, world, gpu_gib, memory_plan.Shape(student.config),
                              memory_plan.Shape(teacher.config))
    if result["engine_short"]:
        weights = result["moments"]["rollout peak"]["vLLM engine: both models' weights (bf16)"] / memory_plan.GiB
        source = "the memory plan's" if result["engine_fraction_planned"] else "set in the config"
        die(f"vllm_gpu_memory_utilization: {result['engine_fraction']} of the {gpu_gib} GiB GPU ({source}) cannot "
            f"hold both models' bf16 weights ({weights:.1f} GiB) and a KV pool beside the trainer's "
            f"{result['engine_beside'] / memory_plan.GiB:.1f} GiB; shard the teacher (teacher_sharding: shard), "
            f"train on more GPUs, or set the fraction by hand")
    return result["engine_fraction"], memory_plan.engine_line(result)


@torch.no_grad()
def visited_sums(student_out, teacher_out, heads, tokens, mask, kwargs, eos_ids, chunk_mib):
    """
    (4,) sums over the completion tokens (mask (B, N)) of beta*, KL(mu* || pi_S), log pi_T(token) and H(pi_T), at the
    rollout's eps and temperature: the diagnostics blended_generate logs, recomputed from the loss forward for a
    rollout that carries none (the vLLM engine's). student_out, teacher_out: (B, N, V) logits, or (B, N, H) hidden
    states with heads = (student head, teacher head); chunk_mib: the loss's byte budget (fast.chunk_rows).
    """
    eps, tau = kwargs["eps"], kwargs["temperature"] or 1.0
    student_out, teacher_out, tokens = student_out[mask], teacher_out[mask], tokens[mask]  # (n, .)
    total = torch.zeros(4)
    rows = fast.chunk_rows(chunk_mib, heads[0].shape[0] if heads is not None else student_out.shape[-1])
    for start in range(0, tokens.shape[0], rows):
        part = slice(start, start + rows)
        s, t = student_out[part].detach(), teacher_out[part]
        if heads is not None:
            s, t = fast.head_logits(s, heads[0]), fast.head_logits(t, heads[1])
        s, t = (trb.canonicalise_eos(x.float() / tau, eos_ids) for x in (s, t))  # (n, V)
        log_pt = torch.log_softmax(t, -1)
        entropy = -(log_pt.exp() * log_pt.nan_to_num(neginf=0.0)).sum(-1)
        logprob = log_pt.gather(-1, tokens[part, None])[:, 0]
        beta = kl = s.new_zeros(())  # eps = 0: the student itself
        if eps > 0:
            beta = trb.solve_beta(s, t, eps)
            kl = trb.reverse_kl(trb.blend_logprobs(s, t, beta), s)  # KL(mu* || pi_S): mu*'s logits are log mu*
        total += torch.stack([beta.sum(), kl.sum(), logprob.sum(), entropy.sum()]).cpu()
    return total

"""Run the ORIGINAL LLaVA-1.5 training entry point, `llava.train.train.train()` (haotian-liu/LLaVA as released on PyPI:
llava-torch 1.2.2.post1), unmodified, and record per-step wall times. Runs in the scratch venv (LLAVA_ORIG_VENV, see
tests/parity/README.md), started by bench/bench_train.py; imports nothing from qllava.

    $LLAVA_ORIG_VENV/bin/python bench/_original_train_driver.py RESULT.json -- --model_name_or_path ... (the original's flags)

What this file adds around `train()` only observes it:
- a `transformers.TrainerCallback` (appended by wrapping `transformers.Trainer.__init__`, which `LLaVATrainer` inherits)
  that stamps the wall clock (`time.time()`, `time.perf_counter()`) and process CPU time at the end of every optimiser
  step, and keeps `state.log_history` (the losses);
- a wrapper of `LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal` that calls the original and counts what the
  LLM is then given: each sample's length after the media expansion (its attention mask), the padded width, the
  `<image>` positions and the images encoded (a text-only sample gets a zero image, which the tower encodes too);
- a wrapper of `CLIPVisionTower.forward` that times the frozen tower (train() puts it in float16 when --bf16 is off,
  also on CPU: `vision_tower.to(dtype=torch.bfloat16 if training_args.bf16 else torch.float16, ...)`), and records its dtype.
Nothing else is changed: no module of the original is edited or replaced, and train() parses sys.argv as it does when
launched by the original scripts (whose train_mem.py calls train(attn_implementation="flash_attention_2"); flash-attn
needs CUDA, so here train() runs with its default, i.e. transformers' sdpa for LLaMA).
"""
import json, os, sys, time

def main():
    if len(sys.argv) < 3 or sys.argv[2] != "--":
        sys.exit("usage: _original_train_driver.py RESULT.json -- FLAGS...")
    result_path, flags = sys.argv[1], sys.argv[3:]
    for k, v in dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true").items():
        os.environ.setdefault(k, v)
    t_start = time.time()
    import torch, transformers, tokenizers, accelerate
    import llava
    import llava.train.train as T
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower
    from llava.model.llava_arch import LlavaMetaForCausalLM

    rec = dict(steps=[], batches=[], tower=[], log_history=[], t_start=t_start, flags=flags,
               versions=dict(python=sys.version.split()[0], torch=torch.__version__, transformers=transformers.__version__,
                             tokenizers=tokenizers.__version__, accelerate=accelerate.__version__,
                             llava_torch=_dist_version("llava-torch"), llava_file=llava.__file__),
               torch_threads=torch.get_num_threads())

    class StepTimes(transformers.TrainerCallback):
        "Stamps the clocks at the end of each optimiser step; keeps the log history at the end."
        def on_train_begin(self, args, state, control, **kw):
            rec["t_train_begin"] = time.time()
            model = kw.get("model")
            if model is not None:
                rec["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
                rec["total_params"] = sum(p.numel() for p in model.parameters())
                rec["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
            dl = kw.get("train_dataloader")
            if dl is not None:
                s = getattr(dl, "batch_sampler", None); s = getattr(s, "sampler", s)
                rec["sampler"] = type(s).__name__
        def on_step_end(self, args, state, control, **kw):
            rec["steps"].append(dict(step=state.global_step, time=time.time(), perf=time.perf_counter(), cpu=time.process_time()))
        def on_train_end(self, args, state, control, **kw):
            rec["t_train_end"] = time.time(); rec["log_history"] = list(state.log_history)
            rec["train_batch_size"] = args.train_batch_size; rec["device"] = str(args.device)

    trainer_init = transformers.Trainer.__init__
    def init_with_timer(self, *a, **k):
        trainer_init(self, *a, **k)
        self.add_callback(StepTimes())
        rec["optim"] = self.args.optim
    transformers.Trainer.__init__ = init_with_timer

    prepare = LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal
    def counting_prepare(self, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes=None):
        out = prepare(self, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes)
        mask = out[2]
        if self.training and mask is not None and out[4] is not None:
            rec["batches"].append(dict(samples=int(mask.shape[0]), width=int(mask.shape[1]), lengths=[int(x) for x in mask.sum(1)],
                                       text_width=int(input_ids.shape[1]), images_in_text=int((input_ids == IMAGE_TOKEN_INDEX).sum()),
                                       images_encoded=int(images.shape[0]) if torch.is_tensor(images) else len(images)))
        return out
    LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal = counting_prepare

    tower_forward = CLIPVisionTower.forward
    def timed_tower(self, images):
        t = time.perf_counter()
        out = tower_forward(self, images)
        rec["tower"].append(dict(seconds=time.perf_counter() - t, dtype=str(self.dtype), images=len(images),
                                 num_patches=int(out.shape[1]) if torch.is_tensor(out) else None))
        return out
    CLIPVisionTower.forward = timed_tower

    sys.argv = ["llava/train/train.py"] + flags
    try:
        T.train()
        rec["ok"] = True
    except BaseException as e:
        rec["ok"] = False; rec["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        rec["t_end"] = time.time()
        with open(result_path, "w") as f: json.dump(rec, f, default=str)


def _dist_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception: return None


if __name__ == "__main__":
    main()

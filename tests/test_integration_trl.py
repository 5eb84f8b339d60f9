"""MemPOGRPOTrainer against TRL's own GRPO loss, in real GRPOTrainer runs on the CPU: a random
tiny Qwen2 with the tiny world's chat tokenizer (saved locally), an in-memory dataset, a
rule-based reward, 2-3 steps of 8-token completions. Skipped where trl is not installed."""
import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from model_dirs import save_chat_model  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from mempo.integrations.trl import MemPOGRPOTrainer, grpo_loss_options  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_chat_model(tmp_path_factory.mktemp("trl") / "model")


def prompts(n=16):
    return datasets.Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": f"Where was person {i} born?"}] for i in range(n)]})


def char_reward(completions, **kwargs):
    """Rule-based and varied within a group (a random model's completions differ in content)."""
    return [float(sum(map(ord, c[0]["content"])) % 5) for c in completions]


def grpo_args(out, **overrides):
    kw = dict(output_dir=str(out), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
              max_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0, save_strategy="no", bf16=False,
              disable_tqdm=True)
    kw.update(overrides)
    return GRPOConfig(**kw)


class ParityTrainer(MemPOGRPOTrainer):
    """Trains with TRL's own loss; on every micro-batch it also computes mempo's loss on the same
    inputs and records both values and both parameter gradients."""

    fake_vllm_ratio = False  # inject vLLM importance-sampling ratios (TRL applies them in the loss)
    fake_tool_mask = False  # inject a tool mask: holes in the loss mask, one completion without loss tokens

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.fake_tool_mask:
            tool_mask = (torch.rand(inputs["completion_ids"].shape) > 0.25).long()
            tool_mask[0] = 0
            inputs = dict(inputs, tool_mask=tool_mask)
        if self.fake_vllm_ratio:
            ratio = torch.rand(inputs["completion_ids"].shape) * 2
            ratio[torch.rand(ratio.shape) < 0.2] = 0.0  # masked-out tokens of vLLM's token_mask mode
            inputs = dict(inputs, importance_sampling_ratio=ratio)
            self.use_vllm = self.vllm_importance_sampling_correction = True  # only the losses read them here
        params = [p for p in model.parameters() if p.requires_grad]
        trl_loss = GRPOTrainer.compute_loss(self, model, inputs)
        trl_grads = torch.autograd.grad(trl_loss, params, retain_graph=True)
        mempo_loss = MemPOGRPOTrainer.compute_loss(self, model, inputs)
        mempo_grads = torch.autograd.grad(mempo_loss, params)
        self.use_vllm = False
        self.records.append((trl_loss.detach(), mempo_loss.detach(), trl_grads, mempo_grads))
        return trl_loss


CASES = [
    ("grpo", {}),
    ("bnpo", {}),
    ("dr_grpo", {}),
    ("dapo", {}),
    # old log-probs present (2 iterations), an update big enough to clip, asymmetric clip,
    # two-sided clip (delta), KL to the reference, temperature, gradient accumulation over a
    # generation batch twice its window (dapo's normaliser rescales by that), completions shorter
    # than max_completion_length (Dr. GRPO's constant), ragged tool masks; 4 steps, since the
    # clip acts from step 3 on in these runs (TRL's clip_ratio/region_mean is 0 at steps 1-2)
    *[(loss_type, dict(num_iterations=2, learning_rate=0.05, epsilon_high=0.28, delta=1.5, beta=0.04,
                       use_bias_correction_kl=False, temperature=0.9, gradient_accumulation_steps=2,
                       steps_per_generation=4, generation_kwargs={"max_new_tokens": 6}, max_steps=4))
      for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo")],
]


@pytest.mark.parametrize("loss_type,overrides", CASES)
def test_loss_and_grads_match_trl_in_a_run(tmp_path, model_dir, loss_type, overrides):
    args = grpo_args(tmp_path, loss_type=loss_type, **overrides)
    trainer = ParityTrainer(model=str(model_dir), reward_funcs=char_reward, args=args, train_dataset=prompts())
    trainer.records, trainer.fake_tool_mask = [], bool(overrides)
    trainer.train()
    assert len(trainer.records) >= 2
    for trl_loss, mempo_loss, trl_grads, mempo_grads in trainer.records:
        torch.testing.assert_close(mempo_loss, trl_loss, rtol=1e-4, atol=1e-6)
        for ours, theirs in zip(mempo_grads, trl_grads):
            torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-5)
    assert any(g.abs().max() > 1e-3 for r in trainer.records for g in r[2])  # the rewards gave advantages
    if overrides:  # the clip acted at least once (TRL's own metric)
        assert any(h.get("clip_ratio/region_mean", 0) > 0 for h in trainer.state.log_history)


def test_vllm_importance_ratios_match_trl(tmp_path, model_dir):
    args = grpo_args(tmp_path, loss_type="dapo", num_iterations=2, learning_rate=0.05, delta=1.5, beta=0.04,
                     use_bias_correction_kl=False)
    trainer = ParityTrainer(model=str(model_dir), reward_funcs=char_reward, args=args, train_dataset=prompts())
    trainer.records, trainer.fake_vllm_ratio = [], True
    trainer.train()
    for trl_loss, mempo_loss, trl_grads, mempo_grads in trainer.records:
        torch.testing.assert_close(mempo_loss, trl_loss, rtol=1e-4, atol=1e-6)
        for ours, theirs in zip(mempo_grads, trl_grads):
            torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-5)


def test_training_with_mempo_follows_trl(tmp_path, model_dir):
    """Two separate 3-step runs from the same seed: GRPOTrainer and MemPOGRPOTrainer log the
    same losses and end at the same weights (float32 tolerance). Plain SGD: Adam would scale the
    rounding noise of near-zero gradients up to a full step."""
    runs = []
    for cls in (GRPOTrainer, MemPOGRPOTrainer):
        args = grpo_args(tmp_path / cls.__name__, max_steps=3, learning_rate=0.1, optim="sgd", num_iterations=2,
                         beta=0.04, use_bias_correction_kl=False)
        trainer = cls(model=str(model_dir), reward_funcs=char_reward, args=args, train_dataset=prompts())
        start = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        runs.append((losses, [p.detach().clone() for p in trainer.model.parameters()]))
    (trl_losses, trl_params), (mempo_losses, mempo_params) = runs
    assert len(trl_losses) == 3 and max(map(abs, trl_losses)) > 1e-3
    assert mempo_losses == pytest.approx(trl_losses, rel=1e-4, abs=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(start, mempo_params))  # it did train
    for ours, theirs in zip(mempo_params, trl_params):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "luspo", "vespo"])
def test_loss_types_without_mempo_equivalent_raise(tmp_path, loss_type):
    args = grpo_args(tmp_path, loss_type=loss_type)
    with pytest.raises(ValueError, match=f"loss_type='{loss_type}' has no mempo equivalent"):
        grpo_loss_options(args)
    with pytest.raises(ValueError, match="no mempo equivalent"):  # before any model is loaded
        MemPOGRPOTrainer(model="no/such/model", reward_funcs=char_reward, args=args, train_dataset=prompts(4))


@pytest.mark.parametrize("field,value", [
    ("importance_sampling_level", "sequence"), ("top_entropy_quantile", 0.5), ("off_policy_mask_threshold", 0.5),
    ("use_bias_correction_kl", True), ("entropy_coef", 0.01), ("delta", 1.2)])
def test_settings_without_mempo_equivalent_raise(tmp_path, field, value):
    settings = dict(loss_type="grpo", epsilon_high=0.28, beta=0.04, use_bias_correction_kl=False)
    args = grpo_args(tmp_path, **{**settings, field: value})
    with pytest.raises(ValueError, match=f"GRPOConfig.{field}="):
        grpo_loss_options(args)


def test_options_mapping(tmp_path):
    args = grpo_args(tmp_path, loss_type="dr_grpo", epsilon=0.1, epsilon_high=0.3, delta=2.0, beta=0.05,
                     use_bias_correction_kl=False)
    assert grpo_loss_options(args) == dict(clip_low=0.1, clip_high=0.3, dual_clip=2.0, kl_coef=0.05,
                                           kl_estimator="k3", loss_agg="seq-mean-token-sum-norm")

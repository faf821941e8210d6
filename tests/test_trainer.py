"""transformers' own Trainer fine-tunes this package's models on a small synthetic task: the loss
falls, and the saved checkpoint loads back in both libraries with the same outputs."""

import warnings

import pytest
import torch

import bloom

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer's dependency

CFG = dict(vocab_size=32, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0, eos_token_id=1, bos_token_id=2)


class Rows(torch.utils.data.Dataset):
    """Random rows of 12 tokens; label 1 when token 5 occurs (sequence classification), and the
    ids themselves as causal-LM labels (a periodic sequence: easy to learn)."""

    def __init__(self, n, causal, seed=0):
        g = torch.Generator().manual_seed(seed)
        if causal:
            starts = torch.randint(3, 8, (n, 1), generator=g)
            self.ids = 3 + (starts + torch.arange(12)) % 8
            self.labels = self.ids.clone()
        else:
            self.ids = torch.randint(3, 32, (n, 12), generator=g)
            self.labels = (self.ids == 5).any(1).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": self.labels[i]}


@pytest.mark.parametrize("name, causal", [("BloomForSequenceClassification", False), ("BloomForCausalLM", True)])
def test_trainer_fine_tunes_and_the_checkpoint_loads_in_both_libraries(name, causal, tmp_path):
    torch.manual_seed(0)
    model = getattr(bloom, name)(bloom.BloomConfig(**CFG))
    data = Rows(256, causal)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=16, gradient_accumulation_steps=2,
        num_train_epochs=4, learning_rate=3e-3, logging_steps=4, report_to=[], save_strategy="no",
        use_cpu=True, seed=0, disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) >= 4 and sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2, losses

    model.save_pretrained(tmp_path / "ckpt")
    model.eval()
    ids = data.ids[:4]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = model(ids).logits
        ours = getattr(bloom, name).from_pretrained(tmp_path / "ckpt")
        theirs = getattr(transformers, name).from_pretrained(tmp_path / "ckpt").eval()
        torch.testing.assert_close(ours(ids).logits, want)
        torch.testing.assert_close(theirs(ids).logits, want, atol=1e-4, rtol=1e-4)

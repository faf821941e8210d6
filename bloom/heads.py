"""Task heads on the BLOOM base model: sequence / token classification and question answering.

Same module names, outputs and losses as transformers' (score, classifier, qa_outputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import BloomConfig
from .model import BloomModel
from .outputs import QuestionAnsweringModelOutput, SequenceClassifierOutputWithPast, TokenClassifierOutput
from .pretrained import BloomPreTrainedModel
from .validation import check_class_labels


def _classification_loss(config: BloomConfig, logits: Tensor, labels: Tensor) -> Tensor:
    """transformers' rule: regression for 1 label, CE for integer labels, BCE otherwise."""
    if config.problem_type is None:
        if config.num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        if config.num_labels == 1:
            return F.mse_loss(logits.squeeze().float(), labels.squeeze().float())
        return F.mse_loss(logits.float(), labels.float())
    if config.problem_type == "single_label_classification":
        check_class_labels(labels, config.num_labels, logits.shape[:-1])
        return F.cross_entropy(logits.float().view(-1, config.num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


class BloomForSequenceClassification(BloomPreTrainedModel):
    """Classifies each sequence from its last non-padding token (pad_token_id decides which)."""

    def __init__(self, config: BloomConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = BloomModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.init_weights()

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, head_mask=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = self.transformer(input_ids, past_key_values, attention_mask, head_mask, inputs_embeds,
                               use_cache, output_attentions, output_hidden_states, return_dict=True,
                               **kwargs)
        logits = self.score(out.last_hidden_state)  # (B, S, num_labels)
        batch = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None and batch != 1:
            raise ValueError("sequence classification of a batch > 1 needs config.pad_token_id to find "
                             "each row's last token")
        if pad is None or input_ids is None:
            last = torch.full((batch,), logits.shape[1] - 1, device=logits.device)
        else:
            # the rightmost token that is not padding (works for left and right padding)
            positions = torch.arange(input_ids.shape[-1], device=logits.device)
            last = (positions * (input_ids != pad).to(logits.device)).argmax(-1)
        pooled = logits[torch.arange(batch, device=logits.device), last]
        loss = None if labels is None else _classification_loss(self.config, pooled, labels.to(logits.device))
        result = SequenceClassifierOutputWithPast(loss, pooled, out.past_key_values, out.hidden_states,
                                                  out.attentions)
        return result if return_dict else result.to_tuple()


class BloomForTokenClassification(BloomPreTrainedModel):
    def __init__(self, config: BloomConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = BloomModel(config)
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(config.hidden_dropout if dropout is None else dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, head_mask=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = self.transformer(input_ids, past_key_values, attention_mask, head_mask, inputs_embeds,
                               False, output_attentions, output_hidden_states, return_dict=True, **kwargs)
        logits = self.classifier(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None:
            check_class_labels(labels, self.num_labels, logits.shape[:-1])
            loss = F.cross_entropy(logits.float().view(-1, self.num_labels), labels.to(logits.device).view(-1))
        result = TokenClassifierOutput(loss, logits, out.hidden_states, out.attentions)
        return result if return_dict else result.to_tuple()


class BloomForQuestionAnswering(BloomPreTrainedModel):
    def __init__(self, config: BloomConfig):
        super().__init__(config)
        self.transformer = BloomModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, head_mask=None, inputs_embeds=None,
                start_positions=None, end_positions=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = self.transformer(input_ids, None, attention_mask, head_mask, inputs_embeds, False,
                               output_attentions, output_hidden_states, return_dict=True, **kwargs)
        start_logits, end_logits = self.qa_outputs(out.last_hidden_state).split(1, dim=-1)
        start_logits = start_logits.squeeze(-1).contiguous()
        end_logits = end_logits.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            # positions outside the input are clamped to an ignored index, as transformers does
            ignored = start_logits.shape[1]
            start = start_positions.reshape(-1).clamp(0, ignored).to(start_logits.device)
            end = end_positions.reshape(-1).clamp(0, ignored).to(end_logits.device)
            loss = (F.cross_entropy(start_logits.float(), start, ignore_index=ignored)
                    + F.cross_entropy(end_logits.float(), end, ignore_index=ignored)) / 2
        result = QuestionAnsweringModelOutput(loss, start_logits, end_logits, out.hidden_states, out.attentions)
        return result if return_dict else result.to_tuple()

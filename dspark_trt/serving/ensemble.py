"""The one rename table at the Triton boundary: for each step of the ensemble, which ensemble tensor feeds
each model input and which ensemble tensor each model output becomes (tensorrtllm_backend keeps one name_map
the same way). `package` writes the ensemble's steps from it (`ensemble_steps`), and a bad input is named by
the client's field (`client_fields`) in preprocessing's and dspark_bls's errors.

Ensemble tensors without a leading underscore are the ensemble's own inputs and outputs: TensorRT-LLM's names,
what clients send and get (declared in triton_repo/ensemble/config.pbtxt); the others pass between steps.
"""
from __future__ import annotations

# (model, {model input: ensemble tensor}, {model output: ensemble tensor}), in the order the ensemble runs them
STEPS = (
    ("preprocessing",
     {"QUERY": "text_input", "STOP_WORDS_DICT": "stop_words", "BAD_WORDS_DICT": "bad_words", "END_ID": "end_id",
      "PAD_ID": "pad_id", "beam_width": "beam_width", "length_penalty": "length_penalty",
      "return_context_logits": "return_context_logits", "return_generation_logits": "return_generation_logits"},
     {"INPUT_ID": "_INPUT_ID", "STOP_WORDS_IDS": "_STOP_WORDS_IDS", "BAD_WORDS_IDS": "_BAD_WORDS_IDS",
      "OUT_END_ID": "_PREPROCESSOR_END_ID"}),
    ("dspark_bls",
     {"input_ids": "_INPUT_ID", "stop_words_list": "_STOP_WORDS_IDS", "bad_words_list": "_BAD_WORDS_IDS",
      "end_id": "_PREPROCESSOR_END_ID", "request_output_len": "max_tokens", "streaming": "stream",
      "temperature": "temperature", "runtime_top_p": "top_p", "runtime_top_k": "top_k", "seed": "seed",
      "random_seed": "random_seed", "return_perf_metrics": "return_perf_metrics",
      "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
      "frequency_penalty": "frequency_penalty", "min_tokens": "min_tokens", "return_log_probs": "return_log_probs"},
     {"output_ids": "_TOKENS", "prefix_length": "_PREFIX_LENGTH", "is_final": "_IS_FINAL",
      "acceptance_rate": "acceptance_rate", "total_accepted_draft_tokens": "total_accepted_draft_tokens",
      "total_draft_tokens": "total_draft_tokens", "cum_log_probs": "cum_log_probs",
      "output_log_probs": "output_log_probs", "request_key": "_REQUEST_KEY"}),
    ("postprocessing",
     {"TOKENS_BATCH": "_TOKENS", "PREFIX_LENGTH": "_PREFIX_LENGTH", "IS_FINAL": "_IS_FINAL",
      "REQUEST_KEY": "_REQUEST_KEY"},
     {"OUTPUT": "text_output"}),
)
# a tensor between steps -> the client's field it is made from (preprocessing tokenizes them)
MADE_FROM = {"_INPUT_ID": "text_input", "_STOP_WORDS_IDS": "stop_words", "_BAD_WORDS_IDS": "bad_words",
             "_PREPROCESSOR_END_ID": "end_id"}


def client_fields(model: str) -> dict[str, str]:
    """{input of `model`: the client's field it carries}, for the errors that name a bad input."""
    inputs = next(inputs for name, inputs, _ in STEPS if name == model)
    return {name: MADE_FROM.get(tensor, tensor) for name, tensor in inputs.items()}


def ensemble_steps() -> str:
    """The `step [...]` entries of the ensemble's config.pbtxt."""
    steps = []
    for model, inputs, outputs in STEPS:
        lines = [f'model_name: "{model}"', "model_version: -1"]
        lines += [f'input_map {{ key: "{name}" value: "{tensor}" }}' for name, tensor in inputs.items()]
        lines += [f'output_map {{ key: "{name}" value: "{tensor}" }}' for name, tensor in outputs.items()]
        steps.append("    {\n" + "".join(f"      {line}\n" for line in lines) + "    }")
    return ",\n".join(steps)

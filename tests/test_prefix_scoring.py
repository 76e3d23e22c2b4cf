"""The quality benchmark's prefix protocol: held-out losses count only the tokens after each text's prefix."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from expertmerge_zoos.evaluation import heldout_loss_table


def test_heldout_loss_from_a_prefix_is_the_mean_nll_of_the_suffix_tokens_only():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(50, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0  # right padding
    starts = torch.tensor([3, 6, 2])
    table = heldout_loss_table(model, None, [], {"d": (ids, mask)}, shared_layers=0, score_from={"d": starts})
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits, -1)
    nll = [
        -logp[row, position - 1, ids[row, position]]
        for row in range(3)
        for position in range(int(starts[row]), int(mask[row].sum()))
    ]
    assert len(nll) == 9 + 6 + 6
    assert abs(table["d"]["base"] - float(torch.stack(nll).mean())) < 1e-5
    whole = heldout_loss_table(model, None, [], {"d": (ids, mask)}, shared_layers=0)
    assert abs(whole["d"]["base"] - table["d"]["base"]) > 1e-4  # the prefix really is left out

"""Bad input and bad numbers stop with one clear line, never silently."""

import pytest
import torch

from qstar_mini.config import tiny
from qstar_mini.errors import DataError, ModelError, NumericalError
from qstar_mini.losses import check_finite
from qstar_mini.mixing import MixingHead
from qstar_mini.step import prepare_model, quiet_star_step
from tiny_models import HIDDEN, batch, tiny_meta, tiny_random_model


def test_nan_in_the_model_stops_the_step_naming_tensor_and_step():
    model = tiny_random_model("llama", dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight[3] = float("nan")
    ids, mask = batch()
    ids[0, 2] = 3
    with pytest.raises(NumericalError, match=r"base_nll has NaN or inf at step 17"):
        quiet_star_step(model, tiny_meta(torch.float32), MixingHead(HIDDEN), ids, mask, tiny(seq_len=7), step=17)


def test_check_finite_names_the_first_bad_tensor():
    with pytest.raises(NumericalError, match="^w has NaN or inf"):
        check_finite(None, loss=torch.tensor(1.0), w=torch.tensor([0.5, float("inf")]))
    check_finite(3, loss=torch.tensor(1.0), reward=None)


def test_attention_without_4d_masks_is_refused_with_the_fix():
    model = tiny_random_model("llama", dtype=torch.float32)
    model.config._attn_implementation = "flash_attention_2"
    from qstar_mini.models.tiny import build_tokenizer
    with pytest.raises(ModelError, match="sdpa' or 'eager'"):
        prepare_model(model, build_tokenizer(), tiny())


def test_a_batch_of_only_padding_is_refused():
    ids, mask = batch(lengths=(3, 2))
    mask[1] = 0
    with pytest.raises(DataError, match="all padding"):
        quiet_star_step(tiny_random_model("llama", dtype=torch.float32), tiny_meta(torch.float32),
                        MixingHead(HIDDEN), ids, mask, tiny(seq_len=7))


def test_a_config_longer_than_the_model_context_is_refused():
    from qstar_mini.errors import ConfigError
    from qstar_mini.models.tiny import build_tokenizer, tiny_model
    tok = build_tokenizer()
    model = tiny_model(tok, hidden_size=32, num_hidden_layers=1, intermediate_size=64, max_position_embeddings=64)
    with pytest.raises(ConfigError, match="exceed the model's context of 64; lower seq_len to at most 56"):
        prepare_model(model, tok, tiny(seq_len=60))


def test_lines_longer_than_seq_len_are_counted_in_a_warning():
    from qstar_mini.models.tiny import build_tokenizer
    from qstar_mini.records import encode_records
    with pytest.warns(UserWarning, match="1 of 2 lines are longer than seq_len=8"):
        enc = encode_records(build_tokenizer(), [{"text": "12345=(13610)5"}, {"text": "1=1"}], 8)
    assert enc.input_ids.shape[1] == 8

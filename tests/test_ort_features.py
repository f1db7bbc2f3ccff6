"""Training features from the fused int4 graph: the same TargetFeatures as the torch target's, within int4's
error, and the feature cache never mixes the two."""
import torch

from dspark_trt.training.data import FeatureExtractor, make_sample
from dspark_trt.training.feature_cache import CachedFeatureExtractor
from dspark_trt.training.ort_features import OrtFeatureExtractor

TAPS = [1, 8, 14, 21, 28]


def _samples(tokenizer):
    texts = ["The capital of France is Paris, and the capital of Italy is", "def add(a, b):\n    return a + b\n"]
    ids = [tokenizer.encode(t) for t in texts]
    return [make_sample(i[:4], i[4:], max_length=64) for i in ids]


def test_int4_graph_features_match_the_torch_targets(smollm2, tmp_path):
    model, tokenizer = smollm2
    samples = _samples(tokenizer)
    ours = OrtFeatureExtractor("smollm2", model, TAPS, max_batch=2, max_length=64, graph_dir=tmp_path)(samples)
    ref = FeatureExtractor(model, TAPS, max_batch=2, max_length=64)(samples)
    assert torch.equal(ours.positions, ref.positions) and torch.equal(ours.seq, ref.seq)
    assert ours.taps.shape == ref.taps.shape and ours.last_hidden.shape == ref.last_hidden.shape
    cosine = torch.nn.functional.cosine_similarity(ours.taps.reshape(-1, 576), ref.taps.reshape(-1, 576), dim=-1)
    assert float(cosine.min()) > 0.97, float(cosine.min())
    with torch.no_grad():
        p, q = (model.lm_head(f.last_hidden).log_softmax(-1) for f in (ours, ref))
    kl = torch.nn.functional.kl_div(p, q, log_target=True, reduction="batchmean")
    assert float(kl) < 0.1
    assert float((p.argmax(-1) == q.argmax(-1)).float().mean()) > 0.8
    torch.testing.assert_close(ours.target_lse, torch.logsumexp(model.lm_head(ours.last_hidden), -1))
    # a second extractor reuses the built graph
    again = OrtFeatureExtractor("smollm2", model, TAPS, max_batch=2, max_length=64, graph_dir=tmp_path)(samples[:1])
    assert len(list(tmp_path.glob("features-*"))) == 1
    rows = ours.seq == 0
    torch.testing.assert_close(again.taps, ours.taps[rows], atol=1e-3, rtol=1e-3)


def test_the_cache_keeps_int4_and_float32_features_apart(smollm2, tmp_path):
    model, tokenizer = smollm2
    samples = _samples(tokenizer)[:1]
    ort = OrtFeatureExtractor("smollm2", model, TAPS, max_batch=1, max_length=64, graph_dir=tmp_path / "g")
    torch_extractor = FeatureExtractor(model, TAPS, max_batch=1, max_length=64)
    int4 = CachedFeatureExtractor(ort, tmp_path / "cache", target_id="t-" + ort.identity("smollm2", 64))(samples)
    fp32 = CachedFeatureExtractor(torch_extractor, tmp_path / "cache", target_id="t")(samples)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    assert not torch.equal(int4.taps, fp32.taps)

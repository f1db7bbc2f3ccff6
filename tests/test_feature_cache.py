"""The on-disk feature cache returns what the target gives (to float16 precision), skips the target
on a hit, is shared between extractors, and stops storing at its byte budget."""
from __future__ import annotations

import torch

from dspark_trt.training.data import FeatureExtractor, Sample
from dspark_trt.training.feature_cache import CachedFeatureExtractor

from conftest import tiny_target


class CountingExtractor(FeatureExtractor):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sequences_run = 0

    def __call__(self, samples):
        self.sequences_run += len(samples)
        return super().__call__(samples)


def _samples(*seqs):
    return [Sample(torch.tensor(s), torch.ones(len(s), dtype=torch.bool)) for s in seqs]


def test_cached_features_equal_fresh_ones_and_hits_skip_the_target(tmp_path):
    target = tiny_target(vocab_size=16, seed=3, num_layers=3)
    plain = FeatureExtractor(target, [0, 1], max_batch=3, max_length=32)
    counting = CountingExtractor(target, [0, 1], max_batch=3, max_length=32)
    cached = CachedFeatureExtractor(counting, tmp_path, target_id="tiny")
    a, b, c = _samples([1, 4, 2, 9, 3], [5, 6, 7], [2, 2, 8, 1])
    cached([a, b])  # fills the cache for a and b
    assert counting.sequences_run == 2
    got = cached([b, c, a])  # b and a hit, only c runs the target
    assert counting.sequences_run == 3 and (cached.hits, cached.misses) == (2, 3)
    want = plain([b, c, a])
    torch.testing.assert_close(got.taps, want.taps, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got.last_hidden, want.last_hidden, rtol=2e-3, atol=2e-3)
    assert torch.equal(got.positions, want.positions) and torch.equal(got.seq, want.seq)
    # a second extractor on the same directory (another run on the same data) starts warm
    other = CachedFeatureExtractor(CountingExtractor(target, [0, 1], max_batch=3, max_length=32), tmp_path, "tiny")
    other([a, b, c])
    assert other.extractor.sequences_run == 0
    # another target identity or other tap layers never reads these files
    CachedFeatureExtractor(counting, tmp_path, target_id="another")([a])
    assert counting.sequences_run == 4


def test_the_cache_stops_storing_at_its_budget(tmp_path):
    target = tiny_target(vocab_size=16, seed=3, num_layers=3)
    counting = CountingExtractor(target, [0, 1], max_batch=2, max_length=32)
    a, b = _samples([1, 2, 3, 4], [4, 3, 2, 1])
    one_sample_bytes = 4 * (3 * target.config.hidden_size * 2 + 4)  # 4 rows: 2 taps + last hidden (float16), lse
    cached = CachedFeatureExtractor(counting, tmp_path, "tiny", max_bytes=one_sample_bytes)
    cached([a, b])
    assert len(list(tmp_path.glob("*.pt"))) == 1 and cached.used_bytes <= one_sample_bytes
    cached([a, b])
    assert counting.sequences_run == 3  # the one not stored is recomputed, the stored one is not

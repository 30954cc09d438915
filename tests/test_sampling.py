import torch

from flawscope.sampling import greedy_coreset, nearest_in_bank


def _brute_force_greedy(points, start, count):
    selected = [start]
    for _ in range(count - 1):
        dist = torch.cdist(points, points[selected]).min(dim=1).values
        selected.append(int(dist.argmax()))
    return selected


def test_greedy_coreset_matches_brute_force_without_projection():
    torch.manual_seed(0)
    points = torch.randn(200, 5)
    index = greedy_coreset(points, 20, projection_dim=0, generator=torch.Generator().manual_seed(3))
    assert index.tolist() == _brute_force_greedy(points, int(index[0]), 20)


def test_greedy_coreset_covers_separated_clusters_first():
    # Four tight clusters far apart: the first four picks must hit four different clusters.
    centres = torch.tensor([[0.0, 0], [100, 0], [0, 100], [100, 100]])
    points = (centres[:, None] + 0.01 * torch.randn(4, 50, 2)).reshape(-1, 2)
    index = greedy_coreset(points, 4, projection_dim=0, generator=torch.Generator().manual_seed(0))
    assert sorted((index // 50).tolist()) == [0, 1, 2, 3]


def test_greedy_coreset_is_seeded_and_projection_keeps_distinct_rows():
    points = torch.randn(500, 64)
    a = greedy_coreset(points, 30, projection_dim=16, generator=torch.Generator().manual_seed(1))
    b = greedy_coreset(points, 30, projection_dim=16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and len(set(a.tolist())) == 30


def test_nearest_in_bank_lists_self_first_then_neighbours():
    bank = torch.tensor([[0.0], [1.0], [3.0], [3.5]])
    neighbours = nearest_in_bank(bank, 2, chunk_size=3)
    assert neighbours.tolist() == [[0, 1], [1, 0], [2, 3], [3, 2]]


def test_greedy_coreset_runs_on_the_features_device():
    # A GPU fit selects there; "meta" stands in for the GPU (the projection is drawn on the generator's CPU).
    index = greedy_coreset(torch.randn(50, 8, device="meta"), 5, 4, generator=torch.Generator().manual_seed(0))
    assert index.device.type == "meta" and index.shape == (5,)

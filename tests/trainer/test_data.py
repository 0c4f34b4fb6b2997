def test_the_view_schedule_visits_every_stored_view_once_per_cycle():
    from kmim.trainer.data import choose_view

    for views in (1, 2, 4, 6):
        for key in ("a", "digits-0007", "x/y"):
            seen = [choose_view(3, epoch, key, views) for epoch in range(3 * views)]
            for cycle in range(3):  # each block of V epochs is a permutation of the V views
                assert sorted(seen[cycle * views : (cycle + 1) * views]) == list(range(views))
            assert seen == [choose_view(3, epoch, key, views) for epoch in range(3 * views)]  # pure: resume
    orders = {tuple(choose_view(0, e, f"k{i}", 6) for e in range(6)) for i in range(50)}
    assert len(orders) > 40  # per-sample orders, not one order for everyone
    assert [choose_view(0, e, "k1", 6) for e in range(6)] != [choose_view(1, e, "k1", 6) for e in range(6)]

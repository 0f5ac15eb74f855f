def test_fake_mlp_trains_one_epoch(run_training):
    metrics = run_training(["data=fake", "model=mlp"])
    assert 0.0 <= metrics["val/acc"] <= 1.0
    assert "test/acc" in metrics

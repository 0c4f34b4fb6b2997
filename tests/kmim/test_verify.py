"""`kmim verify`: shards and stage outputs against the sizes and sha256 their index and manifest recorded."""

from typer.testing import CliRunner

from kmim.cli import app
from kmim.data.synthetic import SyntheticConfig, write_synthetic


def test_verify_finds_changed_truncated_and_missing_shards(tmp_path):
    out = tmp_path / "d"
    write_synthetic(str(out), SyntheticConfig(num_images=30, image_size=16, shard_size=10))
    ok = CliRunner().invoke(app, ["verify", str(out)])
    assert ok.exit_code == 0 and "verify: 3 files" in ok.output, ok.output
    shards = sorted(out.glob("*.tar"))
    data = bytearray(shards[0].read_bytes())
    data[700] ^= 0xFF  # one flipped byte, same size
    shards[0].write_bytes(bytes(data))
    shards[1].write_bytes(shards[1].read_bytes()[:-512])
    shards[2].unlink()
    bad = CliRunner().invoke(app, ["verify", str(out)])
    assert bad.exit_code == 1
    assert f"{shards[0]}: sha256 differs" in bad.output and f"{shards[1]}: size is" in bad.output
    assert f"{shards[2]}: missing" in bad.output


def test_verify_refuses_what_it_cannot_check(tmp_path):
    result = CliRunner().invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code != 0 and "nothing to verify" in str(result.exception)

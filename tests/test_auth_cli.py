"""The command line on secured NATS servers: natscli's connection options as flags and
environment (user:password in the URL, token, nkey seed, creds file, TLS with a client
certificate), a refused connection as one line and exit 2, and the embedded server with auth."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys
import pytest

from services import cli
from shared.nats_auth import ROLES, new_user_seed
from shared.nats_server import EmbeddedNats
from tests.fixtures_nats import Secured
from tests.test_e2e import DATASETS, SHARED_DATA, workspace

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "pa55-w0rd_with.odd-chars"
TOKEN = "t0ken-for-mindx"
OPENSSL = shutil.which("openssl")


@dataclass
class Run:
    rc: int
    out: str
    err: str


async def mindx(*args: str, env: dict[str, str] | None = None) -> Run:
    """`python -m services.cli ...` as a process of its own, without the caller's NATS_*."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "MINDX_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        *args,
        cwd=REPO,
        env={**clean, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return Run(proc.returncode if proc.returncode is not None else -1, out.decode(), err.decode())


async def dlq_list(*args: str, env: dict[str, str] | None = None) -> Run:
    return await mindx("dlq", "list", *args, env=env)


def listed(run: Run) -> None:
    """The command connected and did its work."""
    assert (run.rc, run.out, run.err) == (0, "no dead letters\n", ""), run


def refused(run: Run, *words: str) -> None:
    """One line `mindx dlq list: ...`, exit 2, no traceback."""
    assert run.rc == 2, run
    assert run.err.count("\n") == 1 and run.err.startswith("mindx dlq list: "), run.err
    assert run.out == ""
    for word in words:
        assert word in run.err, run.err


@contextlib.asynccontextmanager
async def server_with(tmp_path: Path, name: str, config: str) -> AsyncIterator[EmbeddedNats]:
    """A nats-server that loads `config` (its authorization, TLS...)."""
    conf = tmp_path / f"{name}.conf"
    conf.write_text(config)
    async with EmbeddedNats(tmp_path / f"{name}-store", config=conf) as server:
        yield server


# --- user and password, token -------------------------------------------------------------------


async def test_user_and_password_in_the_url_in_flags_and_in_the_environment(
    tmp_path: Path,
) -> None:
    users = f'authorization {{ users = [{{ user: "alice", password: "{PASSWORD}" }}] }}'
    async with server_with(tmp_path, "password", users) as server:
        with_secret = server.url.replace("nats://", f"nats://alice:{PASSWORD}@")
        wrong = server.url.replace("nats://", "nats://alice:guess@")
        runs = await asyncio.gather(
            dlq_list("--nats", with_secret, "--log-level", "DEBUG"),
            dlq_list("--nats", server.url, "--nats-user", "alice", "--nats-password", PASSWORD),
            dlq_list(env={"NATS_URL": server.url, "NATS_USER": "alice", "NATS_PASSWORD": PASSWORD}),
            dlq_list("--nats", wrong),
            dlq_list("--nats", server.url, "--nats-user", "alice", "--nats-password", "guess"),
            dlq_list("--nats", server.url),
            dlq_list("--nats", server.url, "--nats-password", PASSWORD),  # no user
        )
    debug, flags, env, wrong_url, wrong_flag, anonymous, no_user = runs
    # with --log-level DEBUG the settings are logged: never the password
    assert debug.rc == 0 and debug.out == "no dead letters\n", debug
    assert PASSWORD not in debug.err and "alice:***@" in debug.err
    listed(flags)
    listed(env)
    for run in (wrong_url, wrong_flag, anonymous):
        refused(run, "authorization failed")
        assert PASSWORD not in run.err
    refused(no_user, "a NATS password needs a user")


async def test_a_token_in_a_flag_and_in_the_environment(tmp_path: Path) -> None:
    async with server_with(tmp_path, "token", f'authorization {{ token: "{TOKEN}" }}') as server:
        runs = await asyncio.gather(
            dlq_list("--nats", server.url, "--nats-token", TOKEN),
            dlq_list("--nats", server.url, env={"NATS_TOKEN": TOKEN}),
            dlq_list("--nats", server.url, "--nats-token", "not-it"),
            dlq_list("--nats", server.url, "--nats-token", TOKEN, "--nats-user", "alice"),
        )
    flag, env, wrong, both = runs
    listed(flag)
    listed(env)
    refused(wrong, "authorization failed")
    refused(both, "not both")


# --- nkeys --------------------------------------------------------------------------------------


async def test_nkey_seed_files(tmp_path: Path, secured_nats: Secured) -> None:
    await secured_nats.connect("service")  # the streams
    operator = str(secured_nats.keys.seed_file("operator"))
    stranger = tmp_path / "stranger.nk"
    stranger.write_bytes(new_user_seed())  # a valid seed the server does not know
    garbage = tmp_path / "garbage.nk"
    garbage.write_text("SUNOTASEED\n")
    url = secured_nats.server.url
    runs = await asyncio.gather(
        dlq_list("--nats", url, "--nats-nkey", operator),
        dlq_list("--nats", url, env={"NATS_NKEY": operator}),
        dlq_list("--nats", url, "--nats-nkey", str(stranger)),
        dlq_list("--nats", url, "--nats-nkey", str(garbage)),
        dlq_list("--nats", url, "--nats-nkey", str(tmp_path / "missing.nk")),
        dlq_list("--nats", url, "--nats-nkey", str(secured_nats.keys.seed_file("brain"))),
        dlq_list("--nats", url),
    )
    flag, env, unknown, bad_seed, missing, brain, anonymous = runs
    listed(flag)
    listed(env)
    refused(unknown, "authorization failed")
    refused(bad_seed, "seed")
    refused(missing, "not found", "missing.nk")
    refused(brain, "not permitted to")  # the brain may not read dead letters
    refused(anonymous, "authorization failed")


# --- a creds file: user JWT signed by an account that the operator signed -----------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _keys(prefix: int) -> tuple[bytes, nkeys.KeyPair, str]:
    seed = bytes(nkeys.encode_seed(os.urandom(32), prefix))
    pair = nkeys.from_seed(bytearray(seed))
    return seed, pair, bytes(pair.public_key).decode()


def _jwt(issuer: nkeys.KeyPair, subject: str, name: str, claims: dict[str, Any]) -> str:
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = {
        "jti": _b64(os.urandom(24)),
        "iat": int(time.time()),
        "iss": bytes(issuer.public_key).decode(),
        "name": name,
        "sub": subject,
        "nats": {**claims, "version": 2},
    }
    signed = f"{header}.{_b64(json.dumps(body).encode())}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


UNLIMITED = {k: -1 for k in ("subs", "data", "payload", "imports", "exports", "conn", "leaf")}


def operator_setup(tmp_path: Path) -> tuple[str, Path, Path]:
    """A server config in operator mode (JetStream enabled for one account), a creds file of a
    user of that account, and one of an account the server does not know."""
    _, operator, op_pub = _keys(nkeys.PREFIX_BYTE_OPERATOR)
    (tmp_path / "op.jwt").write_text(_jwt(operator, op_pub, "op", {"type": "operator"}))
    accounts = {}
    for name, js in (("SYS", {}), ("APP", {"mem_storage": -1, "disk_storage": -1})):
        _, account, pub = _keys(nkeys.PREFIX_BYTE_ACCOUNT)
        limits = {**UNLIMITED, "wildcards": True, "streams": -1, "consumer": -1, **js}
        accounts[name] = (
            account,
            pub,
            _jwt(operator, pub, name, {"type": "account", "limits": limits}),
        )
    _, stranger_account, _ = _keys(nkeys.PREFIX_BYTE_ACCOUNT)

    def creds(account: nkeys.KeyPair, file: Path) -> Path:
        seed, _, pub = _keys(nkeys.PREFIX_BYTE_USER)
        user = _jwt(account, pub, "mindx", {"type": "user", "pub": {}, "sub": {}, "subs": -1})
        file.write_text(
            f"-----BEGIN NATS USER JWT-----\n{user}\n------END NATS USER JWT------\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n"
        )
        file.chmod(0o600)
        return file

    preload = ", ".join(f'{pub}: "{jwt}"' for _, pub, jwt in accounts.values())
    config = (
        f'operator: "{tmp_path / "op.jwt"}"\nresolver: MEMORY\n'
        f"system_account: {accounts['SYS'][1]}\nresolver_preload: {{ {preload} }}\n"
    )
    return (
        config,
        creds(accounts["APP"][0], tmp_path / "app.creds"),
        creds(stranger_account, tmp_path / "stranger.creds"),
    )


async def test_a_creds_file(tmp_path: Path) -> None:
    config, good, stranger = operator_setup(tmp_path)
    async with server_with(tmp_path, "operator", config) as server:
        runs = await asyncio.gather(
            dlq_list("--nats", server.url, "--nats-creds", str(good)),
            dlq_list("--nats", server.url, env={"NATS_CREDS": str(good)}),
            dlq_list("--nats", server.url, "--nats-creds", str(stranger)),
            dlq_list("--nats", server.url, "--nats-creds", str(good), "--nats-nkey", str(good)),
        )
    flag, env, unknown, both = runs
    listed(flag)
    listed(env)
    refused(unknown, "authorization failed")
    refused(both, "not both")


# --- TLS with a client certificate --------------------------------------------------------------


def make_pki(tmp: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and another CA."""
    assert OPENSSL is not None

    def run(*args: str) -> None:
        subprocess.run([OPENSSL, *args], cwd=tmp, check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]
    (tmp / "other").mkdir()
    for ca in ("ca", "other/ca"):
        run(
            "req",
            "-x509",
            *ec,
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.pem",
            "-subj",
            f"/CN={ca.replace('/', '-')}",
        )
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        (tmp / f"{name}.ext").write_text(ext)
        run(
            "req", *ec[:-2], "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}"
        )
        sign = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2"]
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            *sign,
            "-out",
            f"{name}.pem",
            "-extfile",
            f"{name}.ext",
        )
    names = ("ca.pem", "server.pem", "server.key", "client.pem", "client.key", "other/ca.pem")
    return {n: tmp / n for n in names}


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
async def test_tls_with_a_client_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    tls = (
        f'tls {{ cert_file: "{pki["server.pem"]}", key_file: "{pki["server.key"]}", '
        f'ca_file: "{pki["ca.pem"]}", verify: true }}'
    )
    client = ["--nats-tls-cert", str(pki["client.pem"]), "--nats-tls-key", str(pki["client.key"])]
    tls_env = {
        "NATS_CA": str(pki["ca.pem"]),
        "NATS_CERT": str(pki["client.pem"]),
        "NATS_KEY": str(pki["client.key"]),
    }
    async with server_with(tmp_path, "tls", tls) as server:
        url = server.url.replace("nats://", "tls://")
        runs = await asyncio.gather(
            dlq_list("--nats", url, "--nats-tls-ca", str(pki["ca.pem"]), *client),
            dlq_list(env={"NATS_URL": url, **tls_env}),
            dlq_list("--nats", url, "--nats-tls-ca", str(pki["ca.pem"])),  # no client cert
            dlq_list("--nats", url, "--nats-tls-ca", str(pki["other/ca.pem"]), *client),
            dlq_list("--nats", url, "--nats-tls-ca", str(pki["ca.pem"]), client[0], client[1]),
        )
    flags, env, no_cert, wrong_ca, no_key = runs
    listed(flags)
    listed(env)
    refused(no_cert, "cannot connect")
    refused(wrong_ca, "cannot connect")
    refused(no_key, "go together")


# --- the embedded server ------------------------------------------------------------------------


async def run_cli(*args: str) -> int:
    return await asyncio.to_thread(cli.main, list(args))


@pytest.mark.skipif(not DATASETS, reason="../shared/data is not beside the checkout")
async def test_local_commands_on_the_embedded_server_use_their_roles(
    tmp_path: Path,
    ollama_double: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in list(os.environ):
        if name.startswith("NATS_"):
            monkeypatch.delenv(name)
    ws = workspace(tmp_path, [SHARED_DATA / "multiwoz.memory.jsonl"])
    common = ["--workspace", str(ws), "--watermark", "state/last.json"]
    # a whole run: every component as the service, the run and the switch included
    rc = await run_cli("train", "--run-once", "--json", *common, "--ollama", ollama_double.url)
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["status"] == "success", report
    config = ws / "config" / "models.json"
    assert json.loads(config.read_text())["brain"]["left"] == report["new_model"]
    auth = ws / "data" / "auth"
    assert stat.S_IMODE(auth.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in auth.iterdir())
    assert sorted(f.name for f in auth.iterdir()) == sorted(
        [*(f"{r}.nk" for r in ROLES), "nats-server.conf"]
    )
    # the operator asks for the rollback, the service's config updater does it
    assert await run_cli("rollback", *common) == 0
    assert "-> qwen3:0.6b" in capsys.readouterr().out
    assert json.loads(config.read_text())["brain"]["left"] == "qwen3:0.6b"
    # the operator reads dead letters; the memory imports points
    assert await run_cli("dlq", "list", "--json", *common) == 0
    assert json.loads(capsys.readouterr().out) == []
    points = tmp_path / "more.jsonl"
    points.write_text(json.dumps({"id": 99, "content": "User: one more?\nAssistant: Yes."}))
    assert await run_cli("memory", "import", str(points), *common) == 0
    assert "imported 1 memory points" in capsys.readouterr().out

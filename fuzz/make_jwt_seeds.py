#!/usr/bin/env python3
"""Regenerates the `jwt` fuzz target's fixed key set and its seed tokens.

Writes crates/proxy/src/fuzz_jwks.json (public keys: RSA, EC P-256, Ed25519 and an `oct` HMAC
secret) and fuzz/seeds/jwt/*: tokens each key signs validly, and broken variants. The private
keys are thrown away: the fuzzer only needs tokens that verify, not the means to make more.
Needs Python 3 with `cryptography`. Run from the repository root: python3 fuzz/make_jwt_seeds.py
"""
import base64, json, os, pathlib
from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOW = 1_700_000_000  # portico_proxy::fuzz::NOW


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def uint(n, size=None):
    size = size or (n.bit_length() + 7) // 8
    return b64(n.to_bytes(size, "big"))


def js(v):
    return b64(json.dumps(v, separators=(",", ":")).encode())


rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ec_key = ec.generate_private_key(ec.SECP256R1())
ed_key = ed25519.Ed25519PrivateKey.generate()
secret = os.urandom(32)

rn = rsa_key.public_key().public_numbers()
en = ec_key.public_key().public_numbers()
ed_pub = ed_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
jwks = {"keys": [
    {"kty": "RSA", "kid": "rsa1", "alg": "RS256", "use": "sig", "n": uint(rn.n), "e": uint(rn.e)},
    {"kty": "EC", "kid": "ec1", "alg": "ES256", "crv": "P-256", "x": uint(en.x, 32), "y": uint(en.y, 32)},
    {"kty": "OKP", "kid": "ed1", "alg": "EdDSA", "crv": "Ed25519", "x": b64(ed_pub)},
    {"kty": "oct", "kid": "hs1", "alg": "HS256", "k": b64(secret)},
]}
(ROOT / "crates/proxy/src/fuzz_jwks.json").write_text(json.dumps(jwks, indent=1) + "\n")


def sign(alg, kid, claims, header_extra=None):
    header = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    header.update(header_extra or {})
    signing_input = f"{js(header)}.{js(claims)}".encode()
    if alg == "RS256":
        sig = rsa_key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    elif alg == "PS256":
        sig = rsa_key.sign(signing_input, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    elif alg == "ES256":
        r, s = utils.decode_dss_signature(ec_key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    elif alg == "EdDSA":
        sig = ed_key.sign(signing_input)
    elif alg == "HS256":
        h = hmac.HMAC(secret, hashes.SHA256())
        h.update(signing_input)
        sig = h.finalize()
    else:
        sig = b"not a signature"
    return f"{signing_input.decode()}.{b64(sig)}"


base = {"iss": "https://issuer.example", "sub": "user-1", "aud": ["svc.example", "other"],
        "iat": NOW - 10, "exp": NOW + 3600, "email": "u@example.com"}
seeds = {
    "rs256": sign("RS256", "rsa1", base),
    "ps256": sign("PS256", "rsa1", base),
    "es256": sign("ES256", "ec1", base),
    "eddsa": sign("EdDSA", "ed1", base),
    "hs256": sign("HS256", "hs1", base),
    "no_kid": sign("RS256", None, base),
    "no_exp": sign("RS256", "rsa1", {k: v for k, v in base.items() if k != "exp"}),
    "expired": sign("RS256", "rsa1", dict(base, exp=NOW - 3600)),
    "exp_zero": sign("RS256", "rsa1", dict(base, exp=0)),
    "nbf_future": sign("RS256", "rsa1", dict(base, nbf=NOW + 3600)),
    "exp_float": sign("ES256", "ec1", dict(base, exp=NOW + 0.5, nbf=1e300)),
    "unknown_kid": sign("RS256", "nope", base),
    "alg_none": sign("none", "rsa1", base),
    "alg_confusion": sign("HS256", "rsa1", base),
    "unicode_claims": sign("RS256", "rsa1", dict(base, name="é😀\u0000\"\\/", aud="svc.example",
                                                 nested={"a": [1, 2.5, None, True, {"b": "c"}]})),
    "no_sub": sign("EdDSA", "ed1", {k: v for k, v in base.items() if k != "sub"}),
    "padded": sign("RS256", "rsa1", base) + "==",
    "extra_dots": sign("HS256", "hs1", base) + ".x.y",
    "two_parts": f"{js({'alg': 'RS256'})}.{js(base)}",
    "garbage": "not-a-jwt",
    "empty_parts": "..",
}
out = ROOT / "fuzz/seeds/jwt"
out.mkdir(parents=True, exist_ok=True)
for name, token in seeds.items():
    (out / name).write_text(token)
print(f"wrote {len(seeds)} seeds and the key set")

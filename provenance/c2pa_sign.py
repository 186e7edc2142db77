"""C2PA Content Credentials with c2pa-python: signing credentials, the manifest, signing and verification.

Signing is offline: no timestamp server unless one is configured. Without one, validity is judged against the
signing certificate's lifetime, so the certificate the pack creates is long-lived (10 years).
"""

import datetime
import hashlib
import io
import json
import os
from pathlib import Path

from ..errors import KleinError
from .formats import SUFFIXES, format_of_path

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA = ("http://cv.iptc.org/newscodes/digitalsourcetype/"
                                            "compositeWithTrainedAlgorithmicMedia")
SOFTWARE_AGENT = "FLUX.2 [klein] via Klein Nodes"
VALIDITY_YEARS = 10


def default_credentials_dir():
    """Outside ComfyUI: $XDG_CONFIG_HOME/klein_nodes/c2pa (the nodes pass ComfyUI's user directory instead)."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "klein_nodes" / "c2pa"


def create_credentials(folder):
    """A local root CA and a signing certificate issued by it (ES256, P-256), with the extensions c2pa requires:
    v3, AKI/SKI, KeyUsage digitalSignature, EKU emailProtection + documentSigning, not a CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

    now = datetime.datetime.now(datetime.timezone.utc)
    root_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    name = lambda cn: x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Klein Nodes (local)"),  # noqa: E731
                                 x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    root = (x509.CertificateBuilder().subject_name(name("Klein Nodes local C2PA root"))
            .issuer_name(name("Klein Nodes local C2PA root"))
            .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365 * 30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256()))
    document_signing = ObjectIdentifier("1.3.6.1.5.5.7.3.36")
    leaf = (x509.CertificateBuilder().subject_name(name("Klein Nodes local C2PA signer")).issuer_name(root.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365 * VALIDITY_YEARS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION, document_signing]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256()))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    (folder / "chain.pem").write_bytes(leaf.public_bytes(pem))
    (folder / "root.pem").write_bytes(root.public_bytes(pem))
    key_path = folder / "signer.key"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # private from the first byte
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return folder


def load_credentials(credentials=None):
    """{"chain": PEM, "key": PEM, "alg": ..., "tsa_url": ..., "root": PEM or None}.

    `credentials`: None (the pack's local credentials, created on first use in the default folder), a folder
    (created there if empty), or a dict with "chain" and "key" paths (the user's own), optional "alg" and "tsa_url".
    """
    if isinstance(credentials, dict):
        try:
            chain, key = Path(credentials["chain"]).read_bytes(), Path(credentials["key"]).read_bytes()
        except (KeyError, OSError) as e:
            raise KleinError(f"C2PA credentials need readable 'chain' and 'key' PEM files ({e})") from None
        root = Path(credentials["root"]).read_bytes() if credentials.get("root") else None
        return {"chain": chain, "key": key, "alg": credentials.get("alg", "es256"),
                "tsa_url": credentials.get("tsa_url"), "root": root}
    folder = Path(credentials) if credentials else default_credentials_dir()
    if not (folder / "signer.key").exists():
        create_credentials(folder)
    return {"chain": (folder / "chain.pem").read_bytes(), "key": (folder / "signer.key").read_bytes(), "alg": "es256",
            "tsa_url": None, "root": (folder / "root.pem").read_bytes()}


def manifest(title, mime, version, sources=()):
    """The claim. Without `sources` the image was created by the model. `sources` ({"role", "title", "png"}) are
    the images that shaped it, as ingredients: "edited" (img2img / inpainting input: opened, then edited) and
    "reference" (input to the model)."""
    agent = {"name": SOFTWARE_AGENT, "version": version}
    references = [f"source-{i}" for i, s in enumerate(sources) if s["role"] == "reference"]
    edited = [f"source-{i}" for i, s in enumerate(sources) if s["role"] == "edited"]
    with_references = {"parameters": {"ingredientIds": references}} if references else {}
    if edited:
        actions = [{"action": "c2pa.opened", "parameters": {"ingredientIds": edited[:1]}},
                   {"action": "c2pa.edited", "digitalSourceType": COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
                    "softwareAgent": agent, **with_references}]
    else:
        actions = [{"action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA, "softwareAgent": agent,
                    **with_references}]
    return {
        "claim_generator_info": [{"name": "Klein Nodes", "version": version}],
        "title": title,
        "format": mime,
        "assertions": [{"label": "c2pa.actions.v2" if sources else "c2pa.actions", "data": {"actions": actions}}],
    }


def ingredient(index, source):
    """The ingredient record of a source image: its role, title and the SHA-256 of the bytes it was read from."""
    relationship = "parentOf" if source["role"] == "edited" and index == 0 else "inputTo"
    return {"title": source["title"], "relationship": relationship, "label": f"source-{index}",
            "instance_id": "sha256:" + hashlib.sha256(source["png"]).hexdigest()}


def sign(data, mime, title, credentials, version, sources=()):
    """Encoded image bytes -> the same image with a signed C2PA manifest (nothing may be written after this);
    `sources`: see `manifest`."""
    import c2pa

    info = c2pa.C2paSignerInfo(credentials["alg"].encode(), credentials["chain"], credentials["key"],
                               credentials["tsa_url"].encode() if credentials["tsa_url"] else None)
    context = c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}}})
    sources = sorted(sources, key=lambda s: s["role"] != "edited")  # the edited image first: it is the parent
    with c2pa.Signer.from_info(info) as signer, c2pa.Builder(manifest(title, mime, version, sources),
                                                             context) as builder:
        for index, source in enumerate(sources):
            builder.add_ingredient(ingredient(index, source), "image/png", io.BytesIO(source["png"]))
        out = io.BytesIO()
        builder.sign(signer, mime, io.BytesIO(data), out)
    return out.getvalue()


def verify(path, trust_anchor=None):
    """{"state": "Trusted" | "Valid" | "Invalid" | "None", "codes": [...failure codes], "manifest": {...} or None}."""
    import c2pa

    settings = {"verify": {"remote_manifest_fetch": False}}
    if trust_anchor:
        settings["trust"] = {"user_anchors": trust_anchor.decode() if isinstance(trust_anchor, bytes) else trust_anchor}
    fmt = format_of_path(path)
    if fmt is None:  # Content Credentials are read from the formats this pack writes
        return {"state": "None", "codes": [f"not read: {Path(path).suffix or 'no extension'} is not {SUFFIXES}"],
                "manifest": None}
    mime = fmt.mime
    try:
        with open(path, "rb") as f, c2pa.Reader(mime, f, None, c2pa.Context.from_dict(settings)) as reader:
            report = json.loads(reader.json())
            state = reader.get_validation_state()
    except c2pa.C2paError as e:
        if "ManifestNotFound" in type(e).__name__ or "no JUMBF" in str(e):
            return {"state": "None", "codes": [], "manifest": None}
        return {"state": "Invalid", "codes": [f"unreadable: {e}"], "manifest": None}
    failures = (report.get("validation_results", {}).get("activeManifest", {}) or {}).get("failure", [])
    active = report.get("manifests", {}).get(report.get("active_manifest"), {})
    return {"state": str(state), "codes": [f.get("code") for f in failures], "manifest": active}

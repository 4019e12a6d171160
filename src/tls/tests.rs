use super::*;

/// A self-signed ECDSA P-256 certificate for `names`, valid from `from` to `until`
/// (seconds from now), written as `<stem>.pem` and `<stem>-key.pem` into `dir`.
fn certificate(dir: &Path, stem: &str, names: &[&str], from: i64, until: i64) -> CertFiles {
    let mut params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::seconds(from);
    params.not_after = now + time::Duration::seconds(until);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}-key.pem")));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    CertFiles {
        cert: cert_path,
        key: key_path,
        names: vec![],
        default: false,
    }
}

const DAY: i64 = 86_400;

#[test]
fn a_good_certificate_loads_with_its_names_and_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let files = certificate(dir.path(), "api", &["API.example.com", "*.example.com"], -DAY, 30 * DAY);
    let loaded = load_certificate(&files).unwrap();
    assert_eq!(loaded.names, ["api.example.com", "*.example.com"]);
    assert_eq!(loaded.label, "api.example.com");
    let left = loaded.not_after - unix_now();
    assert!((29 * DAY..=30 * DAY).contains(&left), "{left}");
}

#[test]
fn bad_files_are_named_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let good = certificate(dir.path(), "good", &["a.example"], -DAY, DAY);
    let other = certificate(dir.path(), "other", &["b.example"], -DAY, DAY);
    let error = |files: &CertFiles| load_certificate(files).unwrap_err();

    let missing = CertFiles {
        cert: dir.path().join("nope.pem"),
        ..good.clone()
    };
    assert!(error(&missing).starts_with(&format!("certificate {}: cannot read", missing.cert.display())));

    let swapped = CertFiles {
        key: other.key.clone(),
        ..good.clone()
    };
    assert_eq!(
        error(&swapped),
        format!(
            "key {} does not match certificate {}",
            other.key.display(),
            good.cert.display()
        )
    );

    let not_a_key = CertFiles {
        key: good.cert.clone(),
        ..good.clone()
    };
    assert!(
        error(&not_a_key).contains("cannot read a PEM private key"),
        "{}",
        error(&not_a_key)
    );

    let expired = certificate(dir.path(), "old", &["a.example"], -10 * DAY, -DAY);
    assert!(error(&expired).contains("expired at"), "{}", error(&expired));

    let early = certificate(dir.path(), "early", &["a.example"], DAY, 10 * DAY);
    assert!(error(&early).contains("is not valid before"), "{}", error(&early));

    let no_san = certificate(dir.path(), "nosan", &[], -DAY, DAY);
    assert!(
        error(&no_san).contains("no DNS subject alternative name"),
        "{}",
        error(&no_san)
    );
    // Names given in the configuration are enough.
    let named = CertFiles {
        names: vec!["Internal.Example".into()],
        ..no_san
    };
    assert_eq!(load_certificate(&named).unwrap().names, ["internal.example"]);
}

#[test]
fn sni_picks_exact_then_wildcard_then_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let api = load_certificate(&certificate(dir.path(), "api", &["api.example.com"], -DAY, DAY)).unwrap();
    let wild = load_certificate(&certificate(dir.path(), "wild", &["*.example.com"], -DAY, DAY)).unwrap();
    let other = load_certificate(&certificate(dir.path(), "other", &["other.test"], -DAY, DAY)).unwrap();
    let same = |a: &Option<Arc<CertifiedKey>>, b: &LoadedCert| a.as_ref().is_some_and(|k| Arc::ptr_eq(k, &b.key));

    let resolver = SniResolver::new(
        &[(api.clone(), false), (wild.clone(), false), (other.clone(), true)],
        false,
    );
    assert!(same(&resolver.pick(Some("api.example.com")), &api));
    assert!(same(&resolver.pick(Some("API.Example.com.")), &api));
    assert!(same(&resolver.pick(Some("www.example.com")), &wild));
    // A wildcard covers one label only.
    assert!(same(&resolver.pick(Some("a.b.example.com")), &other));
    assert!(same(&resolver.pick(Some("unknown.test")), &other));
    assert!(same(&resolver.pick(None), &other));

    // Without a marked default, the first certificate is; unknown names may be refused.
    let strict = SniResolver::new(&[(api.clone(), false), (wild, false)], true);
    assert!(strict.pick(Some("unknown.test")).is_none());
    assert!(same(&strict.pick(None), &api));
}

#[test]
fn reload_keeps_the_running_certificates_when_the_new_ones_are_bad() {
    let dir = tempfile::tempdir().unwrap();
    let files = certificate(dir.path(), "api", &["api.example.com"], -DAY, DAY);
    let options = TlsOptions {
        certificates: vec![files.clone()],
        min_version: MinVersion::Tls12,
        reject_unknown_sni: false,
        client_ca: None,
        client_auth_required: false,
    };
    let tls = ServerTls::new(&options).unwrap();
    let before = tls.certificates();
    std::fs::write(&files.key, "not a key").unwrap();
    assert!(
        tls.reload(&options)
            .unwrap_err()
            .contains("cannot read a PEM private key")
    );
    assert_eq!(tls.certificates(), before);
    assert_eq!(tls.counts().2, 1);
    // A good replacement is taken.
    let renewed = certificate(dir.path(), "api", &["api.example.com"], -DAY, 90 * DAY);
    assert_eq!(renewed, files);
    tls.reload(&options).unwrap();
    assert!(tls.certificates()[0].not_after > before[0].not_after + 80 * DAY);
}

//! API keys encrypted at rest (issue #11, item 5): sealed with
//! `STRIPE_MIRROR_ENCRYPTION_KEY`, plaintext rows upgraded in place, rotation through
//! `STRIPE_MIRROR_PREVIOUS_ENCRYPTION_KEYS`, and clear errors (never the key) when a
//! row cannot be opened. Checked in the database itself, on SQLite and Postgres.

mod common;

use stripe_mirror::{ApiKey, ApiKeyKind, Config, EncryptionKey, Error, Mirror};

const SK: &str = "sk_test_encryptionAtRest0000abcd";
const PK: &str = "pk_test_encryptionAtRest0000wxyz";
const SK2: &str = "sk_test_addedWhileEncrypted00efgh";

fn key(byte: u8) -> EncryptionKey {
    EncryptionKey::from_bytes([byte; 32])
}

fn with_keys(
    config: &Config,
    current: Option<EncryptionKey>,
    previous: &[EncryptionKey],
) -> Config {
    let mut c = config.clone();
    c.encryption_key = current;
    c.previous_encryption_keys = previous.to_vec();
    c
}

/// The stored `secret` column of every row, as the database holds it.
fn stored(config: &Config) -> Vec<String> {
    let n = common::query_count(
        &config.database_url,
        "SELECT COUNT(*) AS n FROM stripe_api_keys",
    );
    (0..n)
        .map(|i| {
            common::query_text(
                &config.database_url,
                &format!("SELECT secret AS t FROM stripe_api_keys ORDER BY id LIMIT 1 OFFSET {i}"),
            )
        })
        .collect()
}

async fn secrets(m: &Mirror) -> Vec<String> {
    let mut all: Vec<String> = ApiKey::list(m)
        .await
        .unwrap()
        .iter()
        .map(|k| k.secret().expose().to_owned())
        .collect();
    all.sort();
    all
}

#[tokio::test]
async fn plaintext_keys_are_sealed_in_place_and_rotation_reseals_them() {
    for b in common::backends() {
        let n = b.name;
        // Before encryption: two keys in plaintext.
        let plain = Mirror::connect(with_keys(&b.config, None, &[]))
            .await
            .unwrap();
        ApiKey::get_or_create(&plain, SK).await.unwrap();
        ApiKey::get_or_create(&plain, PK).await.unwrap();
        let rows = stored(&b.config);
        assert!(
            rows.iter().any(|r| r == SK),
            "{n}: plaintext before: {rows:?}"
        );

        // Turned on: connect seals both in place; the API reads them as before.
        let (k1, k2) = (key(1), key(2));
        let m1 = Mirror::connect(with_keys(&b.config, Some(k1.clone()), &[]))
            .await
            .unwrap();
        let rows = stored(&b.config);
        assert_eq!(rows.len(), 2, "{n}");
        for r in &rows {
            assert!(
                r.starts_with(&format!("enc:v1:{}:", k1.id())),
                "{n}: sealed: {r}"
            );
            assert!(
                !r.contains("encryptionAtRest"),
                "{n}: no plaintext left: {r}"
            );
        }
        let mut expected = vec![PK.to_owned(), SK.to_owned()];
        expected.sort();
        assert_eq!(secrets(&m1).await, expected, "{n}");
        assert_eq!(
            ApiKey::default_secret_key(&m1).await.unwrap().expose(),
            SK,
            "{n}: the client's key opens"
        );
        assert_eq!(
            ApiKey::default_publishable_key(&m1)
                .await
                .unwrap()
                .as_deref(),
            Some(PK),
            "{n}"
        );
        // A key added now is sealed at once; adding it again finds it.
        let added = ApiKey::get_or_create(&m1, SK2).await.unwrap();
        assert_eq!(
            (added.kind, added.secret().expose()),
            (ApiKeyKind::Secret, SK2)
        );
        assert_eq!(
            ApiKey::get_or_create(&m1, SK2).await.unwrap().id,
            added.id,
            "{n}"
        );
        assert!(
            stored(&b.config).iter().all(|r| r.starts_with("enc:v1:")),
            "{n}"
        );
        assert!(
            !stored(&b.config)
                .iter()
                .any(|r| r.contains("addedWhileEncrypted")),
            "{n}"
        );
        // Nothing left to do: a second pass changes no row.
        assert_eq!(ApiKey::encrypt_stored(&m1).await.unwrap(), 0, "{n}");

        // Rotation: k2 current, k1 previous; connect re-seals every row with k2.
        let before = stored(&b.config);
        let m2 = Mirror::connect(with_keys(
            &b.config,
            Some(k2.clone()),
            std::slice::from_ref(&k1),
        ))
        .await
        .unwrap();
        let after = stored(&b.config);
        assert!(
            after
                .iter()
                .all(|r| r.starts_with(&format!("enc:v1:{}:", k2.id()))),
            "{n}: resealed: {after:?}"
        );
        assert!(before.iter().all(|r| !after.contains(r)), "{n}");
        assert_eq!(secrets(&m2).await.len(), 3, "{n}");
        // The previous key can go: k2 alone opens everything.
        let only2 = Mirror::connect(with_keys(&b.config, Some(k2.clone()), &[]))
            .await
            .unwrap();
        assert_eq!(secrets(&only2).await, secrets(&m2).await, "{n}");

        // The old key alone, or none: the app still starts (the row is left as it
        // is), and reading the key is a clear error naming the key id and the
        // variables, never the secret.
        let old_only = Mirror::connect(with_keys(&b.config, Some(k1.clone()), &[]))
            .await
            .unwrap();
        let err = ApiKey::list(&old_only).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::Decrypt { .. }), "{n}: {err:?}");
        for part in [
            k2.id(),
            "STRIPE_MIRROR_ENCRYPTION_KEY",
            "STRIPE_MIRROR_PREVIOUS_ENCRYPTION_KEYS",
        ] {
            assert!(text.contains(part), "{n}: {part:?} missing from {text}");
        }
        assert_eq!(
            stored(&b.config),
            after,
            "{n}: nothing rewritten by the wrong key"
        );
        let none = Mirror::connect(with_keys(&b.config, None, &[]))
            .await
            .unwrap();
        let err = ApiKey::list(&none).await.unwrap_err();
        assert!(err.to_string().contains(k2.id()), "{n}: {err}");
        for e in [&err.to_string(), &format!("{err:?}")] {
            assert!(
                !e.contains("encryptionAtRest") && !e.contains(&"01".repeat(32)),
                "{n}: {e}"
            );
        }
    }
}

#[tokio::test]
async fn a_sealed_value_changed_or_moved_to_another_row_is_refused() {
    for b in common::backends() {
        let n = b.name;
        let k = key(7);
        let m = Mirror::connect(with_keys(&b.config, Some(k.clone()), &[]))
            .await
            .unwrap();
        let sk = ApiKey::get_or_create(&m, SK).await.unwrap();
        let pk = ApiKey::get_or_create(&m, PK).await.unwrap();
        // Move the publishable key's sealed value onto the secret key's row: the row
        // id is bound into the seal, so it does not open there.
        let sealed_pk = common::query_text(
            &b.config.database_url,
            &format!(
                "SELECT secret AS t FROM stripe_api_keys WHERE id = '{}'",
                pk.id
            ),
        );
        common::execute_sql(
            &b.config.database_url,
            &format!("DELETE FROM stripe_api_keys WHERE id = '{}'", pk.id),
        );
        common::execute_sql(
            &b.config.database_url,
            &format!(
                "UPDATE stripe_api_keys SET secret = '{sealed_pk}' WHERE id = '{}'",
                sk.id
            ),
        );
        let err = ApiKey::list(&m).await.unwrap_err();
        assert!(
            matches!(&err, Error::Decrypt { id, .. } if *id == sk.id),
            "{n}: {err:?}"
        );
        assert!(
            err.to_string().contains("moved from another row"),
            "{n}: {err}"
        );
        // One flipped character of the ciphertext: refused the same way.
        let mut flipped = sealed_pk.clone();
        let last = flipped.pop().unwrap();
        flipped.push(if last == 'a' { 'b' } else { 'a' });
        common::execute_sql(
            &b.config.database_url,
            &format!(
                "UPDATE stripe_api_keys SET secret = '{flipped}' WHERE id = '{}'",
                sk.id
            ),
        );
        let err = ApiKey::list(&m).await.unwrap_err();
        assert!(matches!(err, Error::Decrypt { .. }), "{n}: {err:?}");
        assert!(!err.to_string().contains("encryptionAtRest"), "{n}");
        // A row switched to live mode behind our back: its seal says test.
        common::execute_sql(
            &b.config.database_url,
            &format!("DELETE FROM stripe_api_keys WHERE id = '{}'", sk.id),
        );
        let sk = ApiKey::get_or_create(&m, SK).await.unwrap();
        common::execute_sql(
            &b.config.database_url,
            &format!(
                "UPDATE stripe_api_keys SET livemode = TRUE WHERE id = '{}'",
                sk.id
            ),
        );
        let err = ApiKey::list(&m).await.unwrap_err();
        assert!(
            matches!(&err, Error::Decrypt { id, .. } if *id == sk.id),
            "{n}: {err:?}"
        );
        // The remedy the error names works: remove the row (the app started).
        assert!(ApiKey::remove(&m, &sk.id).await.unwrap(), "{n}");
        assert!(ApiKey::list(&m).await.unwrap().is_empty(), "{n}");
    }
}

#[test]
fn the_environment_names_the_keys_and_refuses_bad_ones() {
    let k1 = EncryptionKey::generate_hex();
    let k2 = EncryptionKey::generate_hex();
    let k3 = EncryptionKey::generate_hex();
    let previous = format!("{k2}, {k3}");
    let vars = [
        ("STRIPE_MIRROR_ENCRYPTION_KEY", k1.as_str()),
        ("STRIPE_MIRROR_PREVIOUS_ENCRYPTION_KEYS", previous.as_str()),
    ];
    let config = Config::from_lookup(|name| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
    })
    .unwrap();
    let ids: Vec<String> = config
        .encryption_keys()
        .iter()
        .map(|k| k.id().to_owned())
        .collect();
    let want: Vec<String> = [&k1, &k2, &k3]
        .iter()
        .map(|h| EncryptionKey::from_hex(h).unwrap().id().to_owned())
        .collect();
    assert_eq!(ids, want, "current first, then the previous ones in order");
    // Debug shows key ids only.
    let debug = format!("{config:?}");
    for k in [&k1, &k2, &k3] {
        assert!(!debug.contains(k.as_str()), "{debug}");
    }
    let err = Config::from_lookup(|name| {
        (name == "STRIPE_MIRROR_ENCRYPTION_KEY").then(|| "not-a-key".to_owned())
    })
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("STRIPE_MIRROR_ENCRYPTION_KEY") && text.contains("64 hex"),
        "{text}"
    );
}

/// Step 1 of a roll-out (`src/encryption.rs`): the new key set only among the previous
/// keys opens rows but seals none. A key added then stays as the current setting has
/// it (plaintext here, as no current key is set), and `encrypt_stored` refuses rather
/// than seal rows that instances without the new key could no longer read.
#[tokio::test]
async fn previous_keys_alone_seal_nothing() {
    for b in common::backends() {
        let n = b.name;
        let new_key = key(7);
        let step1 = Mirror::connect(with_keys(&b.config, None, std::slice::from_ref(&new_key)))
            .await
            .unwrap();
        ApiKey::get_or_create(&step1, SK).await.unwrap();
        assert_eq!(stored(&b.config), vec![SK.to_owned()], "{n}: not sealed");
        let err = ApiKey::encrypt_stored(&step1).await.unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{n}: {err:?}");
        assert!(
            err.to_string().contains("STRIPE_MIRROR_ENCRYPTION_KEY"),
            "{n}: {err}"
        );
        assert_eq!(
            stored(&b.config),
            vec![SK.to_owned()],
            "{n}: left as it was"
        );
        // An instance not yet given the new key still reads every row.
        let old = Mirror::connect(with_keys(&b.config, None, &[]))
            .await
            .unwrap();
        assert_eq!(secrets(&old).await, vec![SK.to_owned()], "{n}");
        // Step 2: the new key becomes the current one, and rows are sealed with it.
        let step2 = Mirror::connect(with_keys(&b.config, Some(new_key.clone()), &[]))
            .await
            .unwrap();
        assert!(
            stored(&b.config)[0].starts_with(&format!("enc:v1:{}:", new_key.id())),
            "{n}"
        );
        assert_eq!(secrets(&step2).await, vec![SK.to_owned()], "{n}");
    }
}

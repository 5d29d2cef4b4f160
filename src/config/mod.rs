//! Configuration. `raw` is the TOML schema as users write it, `types` the
//! validated runtime types the gateway reads, `load` reads and parses a file,
//! `validate/` checks one section per file. Every problem is reported with its
//! key path (`routers.auto.rules[2].tier: unknown tier "lage"`) and, when the
//! file is known, its line and column, all at once.

mod diag;
mod load;
pub mod raw;
mod types;
mod validate;

pub use diag::{ConfigErrors, Problem};
pub use load::{parse_source, Secrets};
pub use types::*;
pub use validate::validate;

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse_with(text: &str, secrets: Secrets) -> Result<Config, ConfigErrors> {
        let env = |k: &str| match k {
            "SET" => Some("secret".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        load::parse_source(text, Path::new("."), None, &env, secrets)
    }

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        parse_with(text, Secrets::Required)
    }

    const BASE: &str = r#"
auth = "none"
[providers.mock]
kind = "mock"
[models.fast]
provider = "mock"
[models.smart]
provider = "mock"
[tiers.small]
models = ["fast"]
[tiers.large]
models = ["smart"]
"#;

    #[test]
    fn reports_every_error_with_its_key_path() {
        let text = format!(
            "{BASE}
[models.bad]
provider = \"opnai\"
[routers.auto]
unknown_tier = \"huge\"
[[routers.auto.rules]]
when = {{ label = \"cod\" }}
tier = \"lage\"
"
        );
        let errs = parse(&text).err().map(|e| e.errors).unwrap_or_default();
        assert!(
            errs.contains(&"models.bad.provider: unknown provider \"opnai\"".to_string()),
            "{errs:?}"
        );
        assert!(errs
            .iter()
            .any(|e| e.starts_with("routers.auto.unknown_tier: unknown tier \"huge\"")));
        assert!(errs.iter().any(|e| e.starts_with(
            "routers.auto.rules[0].tier: unknown tier \"lage\" (known: large, small)"
        )));
        assert!(errs
            .iter()
            .any(|e| e.starts_with("routers.auto.rules[0].when.label: unknown label \"cod\"")));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = parse(&format!(
            "{BASE}\n[server]\nlisten = \"127.0.0.1:1\"\nlistne = 3\n"
        ))
        .err();
        assert!(err
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("listne"));
    }

    #[test]
    fn keys_required_unless_auth_none() {
        let text = BASE.replace("auth = \"none\"", "");
        let errs = parse(&text).err().map(|e| e.errors).unwrap_or_default();
        assert!(errs
            .iter()
            .any(|e| e.starts_with("keys: no keys configured")));
    }

    #[test]
    fn secrets_come_from_env() {
        let ok = parse(&format!("{BASE}\n[providers.real]\nkind = \"openai\"\nbase_url = \"https://x/v1\"\napi_key_env = \"SET\"\n"));
        assert_eq!(
            ok.ok()
                .and_then(|c| c.providers["real"].api_key.clone())
                .as_deref(),
            Some("secret")
        );
        let missing = parse(&format!("{BASE}\n[providers.real]\nkind = \"openai\"\nbase_url = \"https://x/v1\"\napi_key_env = \"UNSET\"\n"));
        assert!(missing
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("providers.real.api_key_env: environment variable UNSET is not set"));
    }

    #[test]
    fn warns_on_unreachable_rules_and_converts_prices() {
        let text = format!(
            "{BASE}
[models.priced]
provider = \"mock\"
price = {{ input = 0.15, output = 0.6 }}
[routers.auto]
unknown_tier = \"large\"
[[routers.auto.rules]]
tier = \"small\"
[[routers.auto.rules]]
when = {{ label = [\"code\", \"math\"] }}
tier = \"large\"
"
        );
        let cfg = parse(&text).map_err(|e| e.to_string());
        let cfg = match cfg {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(cfg.warnings.len(), 1);
        assert!(cfg.warnings[0].starts_with("routers.auto.rules[1]: unreachable"));
        assert_eq!(cfg.models["priced"].price.input, 150_000_000);
        assert_eq!(cfg.models["priced"].price.output, 600_000_000);
        assert_eq!(cfg.models["priced"].price.cached_input, 150_000_000);
    }

    #[test]
    fn tier_fallback_cycles_are_rejected() {
        let text = BASE
            .replace(
                "[tiers.small]\nmodels = [\"fast\"]",
                "[tiers.small]\nmodels = [\"fast\"]\nfallback_tier = \"large\"",
            )
            .replace(
                "[tiers.large]\nmodels = [\"smart\"]",
                "[tiers.large]\nmodels = [\"smart\"]\nfallback_tier = \"small\"",
            );
        let errs = parse(&text).err().map(|e| e.errors).unwrap_or_default();
        assert!(errs.iter().any(|e| e.contains("cycle")), "{errs:?}");
    }

    #[test]
    fn schema_errors_are_all_reported_with_paths_and_places() {
        let text = format!(
            "{BASE}
[store]
bogus_key = 1
kind = \"sqlite\"
[server]
listne = 3
log_format = \"fancy\"
[cache]
scope = \"galaxy\"
"
        );
        let e = match parse(&text) {
            Ok(_) => panic!("accepted"),
            Err(e) => e,
        };
        let errs = &e.errors;
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(errs[0].starts_with("store.bogus_key: unknown field `bogus_key`"));
        assert!(errs[1].starts_with("server.listne: unknown field `listne`"));
        assert!(errs[2].starts_with("server.log_format: unknown variant `fancy`"));
        assert!(errs[3].starts_with("cache.scope: unknown variant `galaxy`"));
        let shown = e.to_string();
        assert!(
            shown.contains("line 15, column 1: store.bogus_key"),
            "{shown}"
        );
        assert!(
            shown.contains("15 | bogus_key = 1\n   | ^^^^^^^^^"),
            "{shown}"
        );
    }

    #[test]
    fn other_sections_are_still_validated_after_a_schema_error() {
        let text = format!(
            "{BASE}\n[cache]\nscope = \"galaxy\"\nttl = \"0s\"\n[tiers.empty]\nmodels = []\n"
        );
        let errs = parse(&text).err().map(|e| e.errors).unwrap_or_default();
        assert!(
            errs[0].starts_with("cache.scope: unknown variant `galaxy`"),
            "{errs:?}"
        );
        assert!(
            errs.contains(&"cache.ttl: must be greater than zero".to_string()),
            "{errs:?}"
        );
        assert!(
            errs.contains(&"tiers.empty.models: needs at least one model".to_string()),
            "{errs:?}"
        );
    }

    #[test]
    fn a_wrong_type_on_a_required_field_is_one_problem() {
        let text = format!(
            "{BASE}\n[routers.r]\nunknown_tier = 3\n[[routers.r.rules]]\ntier = \"small\"\n"
        );
        let errs = parse(&text).err().map(|e| e.errors).unwrap_or_default();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("routers.r.unknown_tier: invalid type"),
            "{errs:?}"
        );
    }

    #[test]
    fn duplicate_keys_and_tables_are_named() {
        let text = format!("{BASE}\n[server]\nlisten = \"127.0.0.1:1\"\nlisten = \"127.0.0.1:2\"\n[tiers.small]\nmodels = []\n");
        let errs = parse(&text).err().map(|e| e.errors).unwrap_or_default();
        assert_eq!(
            errs,
            vec![
                "server.listen: duplicate key `listen`".to_string(),
                "tiers.small: table [tiers.small] is defined twice".to_string(),
            ]
        );
    }

    #[test]
    fn empty_and_unset_secrets_differ_and_check_only_warns() {
        let text = format!("{BASE}\n[providers.real]\nkind = \"openai\"\nbase_url = \"https://x/v1\"\napi_key_env = \"EMPTY\"\n[keys.backend]\nkey_env = \"UNSET\"\n").replace("auth = \"none\"", "");
        let errs = parse(&text).err().map(|e| e.errors).unwrap_or_default();
        assert_eq!(
            errs,
            vec![
                "providers.real.api_key_env: environment variable EMPTY is empty".to_string(),
                "keys.backend.key_env: environment variable UNSET is not set".to_string(),
            ]
        );
        let cfg = match parse_with(&text, Secrets::Optional) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(cfg.keys.len(), 1);
        assert_eq!(cfg.auth, AuthMode::Keys);
        assert!(
            cfg.warnings
                .iter()
                .any(|w| w
                    .starts_with("keys.backend.key_env: environment variable UNSET is not set")),
            "{:?}",
            cfg.warnings
        );
    }

    #[test]
    fn unknown_tiers_list_the_known_ones() {
        let text = format!(
            "{BASE}\n[routers.r]\nunknown_tier = \"larg\"\n[[routers.r.rules]]\ntier = \"small\"\n"
        );
        let errs = parse(&text).err().map(|e| e.errors).unwrap_or_default();
        assert_eq!(
            errs,
            vec![
                r#"routers.r.unknown_tier: unknown tier "larg" (known: large, small)"#.to_string()
            ]
        );
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// Lines that are each valid TOML on their own, assembled in any order
        /// and number: duplicate tables, wrong types, unknown keys, dangling
        /// references. Validation must report, never panic.
        fn line() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("[providers.p]\nkind = \"mock\"".to_string()),
                Just("[providers.o]\nkind = \"openai\"\nbase_url = \"http://x/v1\"".to_string()),
                Just("[models.m]\nprovider = \"p\"".to_string()),
                Just("[models.n]\nprovider = \"nope\"\nfallbacks = [\"m\", \"n\"]".to_string()),
                Just("[tiers.t]\nmodels = [\"m\"]\nfallback_tier = \"t\"".to_string()),
                Just("[tiers.u]\nmodels = []\nstrategy = \"weighted\"".to_string()),
                Just(
                    "[routers.r]\nunknown_tier = \"t\"\n[[routers.r.rules]]\ntier = \"u\""
                        .to_string()
                ),
                Just("[routers.m]\nunknown_tier = \"x\"\nclassifier = \"llm\"".to_string()),
                Just("[keys.k]\nkey_sha256 = \"zz\"\nrpm = 0\nbudget = -1.0".to_string()),
                Just("[cache]\nttl = \"0s\"\nscope = \"galaxy\"".to_string()),
                Just("[server]\nlisten = \"not an address\"".to_string()),
                Just("auth = \"none\"".to_string()),
                "[a-z_.\\[\\]= \"0-9]{0,40}",
            ]
        }

        proptest! {
            #[test]
            fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
                let _ = Config::parse(&text, Path::new("."));
            }

            #[test]
            fn shuffled_sections_never_panic(lines in proptest::collection::vec(line(), 0..12)) {
                let text = lines.join("\n");
                if let Err(e) = Config::parse(&text, Path::new(".")) {
                    // Every problem names where it is.
                    prop_assert!(e.errors.iter().all(|m| !m.is_empty()));
                }
            }
        }
    }
}

//! Gateway state. `Runtime` is everything derived from the config file and is
//! swapped atomically on reload; the rest (deployment health, limits, spend,
//! cache, metrics) outlives reloads.

use crate::auth::KeyTable;
use crate::config::Config;
use crate::route::Health;
use crate::upstream::Provider;
use crate::StartupError;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub struct Runtime {
    pub config: Arc<Config>,
    pub providers: HashMap<String, Arc<Provider>>,
    pub keys: KeyTable,
}

impl Runtime {
    pub fn build(config: Config) -> Result<Runtime, StartupError> {
        let mut providers = HashMap::new();
        for (name, p) in &config.providers {
            let provider = Provider::new(p.clone()).map_err(|e| StartupError::Provider(name.clone(), e.to_string()))?;
            providers.insert(name.clone(), Arc::new(provider));
        }
        Ok(Runtime {
            keys: KeyTable::new(&config.keys),
            config: Arc::new(config),
            providers,
        })
    }

    pub fn provider(&self, name: &str) -> Option<&Arc<Provider>> {
        self.providers.get(name)
    }
}

pub struct AppState {
    pub runtime: ArcSwap<Runtime>,
    pub health: Health,
    pub ready: AtomicBool,
}

impl AppState {
    pub fn new(runtime: Runtime) -> Self {
        AppState {
            runtime: ArcSwap::from_pointee(runtime),
            health: Health::default(),
            ready: AtomicBool::new(false),
        }
    }
}

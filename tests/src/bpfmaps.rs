//! Reads an agent's pinned maps through `bpftool -j` (raw bytes, decoded with the shared
//! `lb_common` types), so tests check what the programs actually see.

use std::{collections::BTreeMap, net::IpAddr, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};
use lb_common::{Backend, MaglevSlot, SvcKey, SvcVal, addr, maps};

/// Raw `(key, value)` byte pairs of a map dump.
fn dump(args: &[&str]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(["map", "dump"])
        .args(args)
        .output()
        .context("running bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool map dump {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let entries: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).context("bpftool json")?;
    let bytes = |v: &serde_json::Value| -> Result<Vec<u8>> {
        v.as_array()
            .context("hex array")?
            .iter()
            .map(|b| {
                let s = b.as_str().context("hex byte")?;
                u8::from_str_radix(s.trim_start_matches("0x"), 16).context("hex byte")
            })
            .collect()
    };
    entries
        .iter()
        .map(|e| Ok((bytes(&e["key"])?, bytes(&e["value"])?)))
        .collect()
}

/// Reinterprets `bytes` as the `#[repr(C)]` integer aggregate `T` (every bit pattern valid).
fn decode<T: Copy>(bytes: &[u8]) -> Result<T> {
    if bytes.len() != size_of::<T>() {
        bail!("expected {} bytes, got {}", size_of::<T>(), bytes.len());
    }
    // SAFETY: length checked; T is a plain integer aggregate (lb_common's map types).
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

fn pinned(bpffs: &Path, map: &str) -> String {
    bpffs.join("maps").join(map).display().to_string()
}

pub fn frontends(bpffs: &Path) -> Result<BTreeMap<SvcKey, SvcVal>> {
    dump(&["pinned", &pinned(bpffs, maps::SERVICES)])?
        .iter()
        .map(|(k, v)| Ok((decode(k)?, decode(v)?)))
        .collect()
}

pub fn backends(bpffs: &Path) -> Result<BTreeMap<u32, Backend>> {
    dump(&["pinned", &pinned(bpffs, maps::BACKENDS)])?
        .iter()
        .map(|(k, v)| Ok((decode(k)?, decode(v)?)))
        .collect()
}

/// The Maglev table a frontend value names: slots `first .. first + size` of its slab.
pub fn table(bpffs: &Path, val: &SvcVal) -> Result<Vec<MaglevSlot>> {
    let (slab, first) = (
        maps::loc_slab(val.table_loc),
        maps::loc_first(val.table_loc),
    );
    let outer = dump(&["pinned", &pinned(bpffs, maps::MAGLEV)])?;
    let inner_id: u32 = outer
        .iter()
        .find(|(k, _)| decode::<u32>(k).is_ok_and(|i| i == slab))
        .map(|(_, v)| decode(v))
        .transpose()?
        .with_context(|| format!("no Maglev slab {slab}"))?;
    let wanted = first..first + val.table_size;
    let mut slots: Vec<(u32, MaglevSlot)> = dump(&["id", &inner_id.to_string()])?
        .iter()
        .map(|(k, v)| Ok((decode(k)?, decode(v)?)))
        .filter(|r: &Result<(u32, MaglevSlot)>| r.as_ref().is_ok_and(|(i, _)| wanted.contains(i)))
        .collect::<Result<_>>()?;
    slots.sort_by_key(|(i, _)| *i);
    if slots.len() != val.table_size as usize {
        bail!(
            "slab {slab} holds {} of the table's {} slots",
            slots.len(),
            val.table_size
        );
    }
    Ok(slots.into_iter().map(|(_, s)| s).collect())
}

/// The table of the frontend `key`, as backend `(address, port)` per slot: comparable across
/// nodes whose agents numbered their backends differently.
pub fn resolved_table(bpffs: &Path, key: &SvcKey) -> Result<Vec<(IpAddr, u16)>> {
    let fe = frontends(bpffs)?;
    let val = fe.get(key).context("frontend not programmed")?;
    let backends = backends(bpffs)?;
    table(bpffs, val)?
        .iter()
        .map(|s| {
            let b = backends
                .get(&s.backend)
                .with_context(|| format!("slot names missing backend {}", s.backend))?;
            Ok((addr::to_ip(&b.addr), u16::from_be(b.port)))
        })
        .collect()
}

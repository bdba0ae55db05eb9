//! The exported NVML C functions. Each one checks its pointers, looks the GPU up in the current state and
//! answers as the real library would, including its error codes.

#![allow(non_snake_case)]

use crate::config::{pci_bus, uuid};
use crate::state::{lock, State};
use nvml_wrapper_sys::bindings::field_id::{
    NVML_FI_DEV_MEMORY_TEMP, NVML_FI_DEV_PCIE_REPLAY_COUNTER, NVML_FI_DEV_REMAPPED_COR,
    NVML_FI_DEV_REMAPPED_FAILURE, NVML_FI_DEV_REMAPPED_PENDING, NVML_FI_DEV_REMAPPED_UNC,
    NVML_FI_DEV_RETIRED_DBE, NVML_FI_DEV_RETIRED_SBE, NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION,
};
use nvml_wrapper_sys::bindings::{
    nvmlDevice_t, nvmlEventData_t, nvmlEventSet_t, nvmlFieldValue_t, nvmlMemory_v2_t,
    nvmlPciInfo_t, nvmlReturn_t, nvmlUtilization_t,
    nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_INT,
    nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, nvmlValue_t,
};
use std::ffi::{c_char, c_int, c_uint, c_ulonglong};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SUCCESS: nvmlReturn_t = 0;
const ERROR_UNINITIALIZED: nvmlReturn_t = 1;
const ERROR_INVALID_ARGUMENT: nvmlReturn_t = 2;
const ERROR_NOT_SUPPORTED: nvmlReturn_t = 3;
const ERROR_INSUFFICIENT_SIZE: nvmlReturn_t = 7;
const ERROR_DRIVER_NOT_LOADED: nvmlReturn_t = 9;
const ERROR_TIMEOUT: nvmlReturn_t = 10;
const ERROR_GPU_IS_LOST: nvmlReturn_t = 15;
const ERROR_UNKNOWN: nvmlReturn_t = 999;

const EVENT_TYPE_XID_CRITICAL_ERROR: u64 = 0x8;
const MEMORY_ERROR_CORRECTED: c_uint = 0;
const MEMORY_ERROR_UNCORRECTED: c_uint = 1;
const TEMPERATURE_GPU: c_uint = 0;
const CLOCK_GRAPHICS: c_uint = 0;
const CLOCK_SM: c_uint = 1;
const CLOCK_MEM: c_uint = 2;
const RETIRED_FOR_SINGLE_BIT: c_uint = 0;
const RETIRED_FOR_DOUBLE_BIT: c_uint = 1;
const THROTTLE_GPU_IDLE: u64 = 0x1;
/// The window NVML averages encoder and decoder utilisation over, in microseconds.
const CODEC_SAMPLING_PERIOD_US: c_uint = 167_000;

/// Device handles are `index + 1` cast to a pointer: never dereferenced, never null.
fn handle(index: usize) -> nvmlDevice_t {
    (index + 1) as nvmlDevice_t
}

/// Resolves a handle to a GPU that exists, is initialised and is not lost.
fn gpu(state: &State, device: nvmlDevice_t) -> Result<usize, nvmlReturn_t> {
    if state.init_count == 0 {
        return Err(ERROR_UNINITIALIZED);
    }
    let index = (device as usize)
        .checked_sub(1)
        .ok_or(ERROR_INVALID_ARGUMENT)?;
    if index >= state.gpus().len() {
        return Err(ERROR_INVALID_ARGUMENT);
    }
    if state.config.fault(index).is_some_and(|f| f.lost) {
        return Err(ERROR_GPU_IS_LOST);
    }
    Ok(index)
}

/// Runs `f` on a resolved GPU and writes its answer through `out`.
///
/// # Safety
/// `out` must be null or valid for writing a `T`.
unsafe fn answer<T>(
    device: nvmlDevice_t,
    out: *mut T,
    f: impl FnOnce(&State, usize) -> Result<T, nvmlReturn_t>,
) -> nvmlReturn_t {
    if out.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let state = lock();
    match gpu(&state, device).and_then(|i| f(&state, i)) {
        Ok(v) => {
            // SAFETY: non-null and valid for writes per this function's contract.
            unsafe { out.write(v) };
            SUCCESS
        }
        Err(code) => code,
    }
}

/// Copies `text` and a NUL into a caller buffer of `length` bytes.
///
/// # Safety
/// `buf` must be null or valid for writing `length` bytes.
unsafe fn write_str(text: &str, buf: *mut c_char, length: c_uint) -> nvmlReturn_t {
    if buf.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let bytes = text.as_bytes();
    if bytes.len() + 1 > length as usize {
        return ERROR_INSUFFICIENT_SIZE;
    }
    // SAFETY: the buffer holds `length` bytes, and we write `bytes.len() + 1 <= length` of them.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), buf, bytes.len());
        buf.add(bytes.len()).write(0);
    }
    SUCCESS
}

fn init() -> nvmlReturn_t {
    let mut state = lock();
    if state.config_error.is_some() {
        return ERROR_UNKNOWN;
    }
    if !state.config.driver_loaded {
        return ERROR_DRIVER_NOT_LOADED;
    }
    state.init_count += 1;
    SUCCESS
}

#[no_mangle]
pub extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    init()
}

#[no_mangle]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> nvmlReturn_t {
    init()
}

#[no_mangle]
pub extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    let mut state = lock();
    if state.init_count == 0 {
        return ERROR_UNINITIALIZED;
    }
    state.init_count -= 1;
    SUCCESS
}

#[no_mangle]
pub extern "C" fn nvmlErrorString(result: nvmlReturn_t) -> *const c_char {
    let text: &'static [u8] = match result {
        SUCCESS => b"Success\0",
        ERROR_UNINITIALIZED => b"Uninitialized\0",
        ERROR_INVALID_ARGUMENT => b"Invalid Argument\0",
        ERROR_NOT_SUPPORTED => b"Not Supported\0",
        ERROR_INSUFFICIENT_SIZE => b"Insufficient Size\0",
        ERROR_DRIVER_NOT_LOADED => b"Driver Not Loaded\0",
        ERROR_TIMEOUT => b"Timeout\0",
        ERROR_GPU_IS_LOST => b"GPU is lost\0",
        _ => b"Unknown Error\0",
    };
    text.as_ptr().cast()
}

/// # Safety
/// `version` must be valid for `length` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    let v = lock().config.driver_version.clone();
    // SAFETY: forwarded caller contract.
    unsafe { write_str(&v, version, length) }
}

/// # Safety
/// `version` must be valid for `length` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetNVMLVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    let v = format!("12.{}", lock().config.driver_version);
    // SAFETY: forwarded caller contract.
    unsafe { write_str(&v, version, length) }
}

/// # Safety
/// `count` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> nvmlReturn_t {
    if count.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let state = lock();
    if state.init_count == 0 {
        return ERROR_UNINITIALIZED;
    }
    // The driver unloaded under a running process (rmmod): NVML answers that it is gone.
    if !state.config.driver_loaded {
        return ERROR_DRIVER_NOT_LOADED;
    }
    // SAFETY: checked non-null; caller guarantees validity.
    unsafe { count.write(state.gpus().len() as c_uint) };
    SUCCESS
}

/// # Safety
/// `device` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    if device.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let state = lock();
    if state.init_count == 0 {
        return ERROR_UNINITIALIZED;
    }
    let index = index as usize;
    if index >= state.gpus().len() {
        return ERROR_INVALID_ARGUMENT;
    }
    // A lost GPU still has a handle; the queries on it fail, as with the real driver.
    // SAFETY: checked non-null; caller guarantees validity.
    unsafe { device.write(handle(index)) };
    SUCCESS
}

/// # Safety
/// `index` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetIndex(
    device: nvmlDevice_t,
    index: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe { answer(device, index, |_, i| Ok(i as c_uint)) }
}

/// # Safety
/// `name` must be valid for `length` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    let text = {
        let state = lock();
        match gpu(&state, device) {
            Ok(i) => state.gpus()[i].name,
            Err(code) => return code,
        }
    };
    // SAFETY: forwarded caller contract.
    unsafe { write_str(text, name, length) }
}

/// # Safety
/// `out` must be valid for `length` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    out: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    let text = {
        let state = lock();
        match gpu(&state, device) {
            Ok(i) => uuid(i),
            Err(code) => return code,
        }
    };
    // SAFETY: forwarded caller contract.
    unsafe { write_str(&text, out, length) }
}

fn fill(dst: &mut [c_char], text: &str) {
    for (d, b) in dst.iter_mut().zip(text.bytes().chain(std::iter::once(0))) {
        *d = b as c_char;
    }
}

/// # Safety
/// `pci` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe {
        answer(device, pci, |state, i| {
            let bus = pci_bus(i);
            // SAFETY: nvmlPciInfo_t is plain integers and char arrays; all-zero is a valid value.
            let mut info: nvmlPciInfo_t = std::mem::zeroed();
            info.domain = 0;
            info.bus = bus;
            info.device = 0;
            info.pciDeviceId = state.gpus()[i].pci_device_id;
            info.pciSubSystemId = 0x16c1_10de;
            fill(&mut info.busId, &format!("00000000:{bus:02X}:00.0"));
            fill(&mut info.busIdLegacy, &format!("0000:{bus:02X}:00.0"));
            Ok(info)
        })
    }
}

/// # Safety
/// `temp` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: nvmlDevice_t,
    sensor: c_uint,
    temp: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe {
        answer(device, temp, |state, i| {
            if sensor != TEMPERATURE_GPU {
                return Err(ERROR_INVALID_ARGUMENT);
            }
            let base = state.gpus()[i].base_temperature_c + i as u32;
            Ok(state
                .config
                .fault(i)
                .and_then(|f| f.temperature_c)
                .unwrap_or(base))
        })
    }
}

/// Milliwatts, a little above idle and different per GPU so dashboards show distinct lines.
fn power_mw(state: &State, i: usize) -> u32 {
    state.gpus()[i].idle_power_mw + 1_500 * i as u32
}

/// Millijoules since the library was loaded, consistent with the reported power.
fn energy_mj(state: &State, i: usize) -> u64 {
    let ms = state.loaded_at.elapsed().as_millis() as u64;
    u64::from(power_mw(state, i)) * ms / 1000
}

/// # Safety
/// `power` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(
    device: nvmlDevice_t,
    power: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe { answer(device, power, |state, i| Ok(power_mw(state, i))) }
}

/// # Safety
/// `energy` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTotalEnergyConsumption(
    device: nvmlDevice_t,
    energy: *mut c_ulonglong,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe { answer(device, energy, |state, i| Ok(energy_mj(state, i))) }
}

/// GPU utilisation (%): different per GPU, GPU 0 idle.
fn gpu_util(i: usize) -> c_uint {
    (10 * i as c_uint) % 100
}

/// # Safety
/// `util` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: nvmlDevice_t,
    util: *mut nvmlUtilization_t,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe {
        answer(device, util, |_, i| {
            Ok(nvmlUtilization_t {
                gpu: gpu_util(i),
                memory: (5 * i as c_uint) % 100,
            })
        })
    }
}

/// # Safety
/// `memory` must be valid for reads and writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    const VERSION_2: c_uint = (std::mem::size_of::<nvmlMemory_v2_t>() | (2 << 24)) as c_uint;
    // SAFETY: the caller passes a struct whose version field it has set, as the real API demands.
    if memory.is_null() || unsafe { (*memory).version } != VERSION_2 {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: forwarded caller contract.
    unsafe {
        answer(device, memory, |state, i| {
            let total = state.gpus()[i].memory_total_bytes;
            let used = 512 * 1024 * 1024 * (i as u64 + 1);
            let reserved = 500 * 1024 * 1024;
            Ok(nvmlMemory_v2_t {
                version: VERSION_2,
                total,
                reserved,
                free: total - used - reserved,
                used,
            })
        })
    }
}

/// # Safety
/// `counts` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    device: nvmlDevice_t,
    error_type: c_uint,
    _counter_type: c_uint,
    counts: *mut c_ulonglong,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe {
        answer(device, counts, |state, i| {
            let fault = state.config.fault(i);
            match error_type {
                MEMORY_ERROR_CORRECTED => Ok(fault.map_or(0, |f| f.ecc_single_bit)),
                MEMORY_ERROR_UNCORRECTED => Ok(fault.map_or(0, |f| f.ecc_double_bit)),
                _ => Err(ERROR_INVALID_ARGUMENT),
            }
        })
    }
}

/// # Safety
/// `clock` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(
    device: nvmlDevice_t,
    kind: c_uint,
    clock: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe {
        answer(device, clock, |state, i| match kind {
            CLOCK_GRAPHICS | CLOCK_SM => Ok(state.gpus()[i].sm_clock_mhz),
            CLOCK_MEM => Ok(state.gpus()[i].mem_clock_mhz),
            _ => Err(ERROR_NOT_SUPPORTED),
        })
    }
}

/// # Safety
/// `set` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut nvmlEventSet_t) -> nvmlReturn_t {
    if set.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let mut state = lock();
    if state.init_count == 0 {
        return ERROR_UNINITIALIZED;
    }
    let id = state.next_set;
    state.next_set += 1;
    state.sets.insert(id, Default::default());
    // SAFETY: checked non-null; caller guarantees validity. Set handles are ids, never dereferenced.
    unsafe { set.write(id as nvmlEventSet_t) };
    SUCCESS
}

#[no_mangle]
pub extern "C" fn nvmlEventSetFree(set: nvmlEventSet_t) -> nvmlReturn_t {
    match lock().sets.remove(&(set as usize)) {
        Some(_) => SUCCESS,
        None => ERROR_INVALID_ARGUMENT,
    }
}

/// # Safety
/// `types` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(
    device: nvmlDevice_t,
    types: *mut c_ulonglong,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe { answer(device, types, |_, _| Ok(EVENT_TYPE_XID_CRITICAL_ERROR)) }
}

#[no_mangle]
pub extern "C" fn nvmlDeviceRegisterEvents(
    device: nvmlDevice_t,
    types: c_ulonglong,
    set: nvmlEventSet_t,
) -> nvmlReturn_t {
    let mut state = lock();
    let index = match gpu(&state, device) {
        Ok(i) => i,
        Err(code) => return code,
    };
    if types & !EVENT_TYPE_XID_CRITICAL_ERROR != 0 {
        return ERROR_NOT_SUPPORTED;
    }
    match state.sets.get_mut(&(set as usize)) {
        Some(s) => {
            s.registered.push((index, types));
            SUCCESS
        }
        None => ERROR_INVALID_ARGUMENT,
    }
}

/// Delivers the next XID not yet delivered of a GPU registered on this set, waiting up to `timeout_ms` for one to
/// be injected. Once a registered GPU that is lost has no XID left to deliver, the wait fails with
/// `NVML_ERROR_GPU_IS_LOST`, as the real library's does.
///
/// # Safety
/// `data` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: nvmlEventSet_t,
    data: *mut nvmlEventData_t,
    timeout_ms: c_uint,
) -> nvmlReturn_t {
    if data.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let deadline = Instant::now() + Duration::from_millis(u64::from(timeout_ms));
    loop {
        {
            let mut guard = lock();
            let state = &mut *guard;
            let Some(es) = state.sets.get(&(set as usize)) else {
                return ERROR_INVALID_ARGUMENT;
            };
            let mut lost = false;
            for &(index, mask) in &es.registered {
                if mask & EVENT_TYPE_XID_CRITICAL_ERROR == 0 {
                    continue;
                }
                let fault = state.config.fault(index);
                let xids = fault.map(|f| f.xid.as_slice()).unwrap_or_default();
                let done = state.xids_delivered.entry(index).or_insert(0);
                if let Some(&xid) = xids.get(*done) {
                    *done += 1;
                    // SAFETY: checked non-null; caller guarantees validity.
                    unsafe {
                        data.write(nvmlEventData_t {
                            device: handle(index),
                            eventType: EVENT_TYPE_XID_CRITICAL_ERROR,
                            eventData: xid,
                            gpuInstanceId: 0xffff_ffff,
                            computeInstanceId: 0xffff_ffff,
                        })
                    };
                    return SUCCESS;
                }
                lost |= fault.is_some_and(|f| f.lost);
            }
            if lost {
                return ERROR_GPU_IS_LOST;
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return ERROR_TIMEOUT;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(20)));
    }
}

/// Memory (HBM) temperature: the fault file's, else the model's where it has a sensor NVML reports.
fn memory_temperature(state: &State, i: usize) -> Result<c_uint, nvmlReturn_t> {
    let model = state.gpus()[i]
        .base_memory_temperature_c
        .map(|t| t + i as u32);
    state
        .config
        .fault(i)
        .and_then(|f| f.memory_temperature_c)
        .or(model)
        .ok_or(ERROR_NOT_SUPPORTED)
}

fn pcie_replays(state: &State, i: usize) -> c_uint {
    state.config.fault(i).map_or(0, |f| f.pcie_replays)
}

/// Pages retired for `cause`. L4 and H100 remap rows instead of retiring pages, so NVML reports page retirement
/// as not supported there unless the fault file gives the GPU retired pages.
fn retired_pages(state: &State, i: usize, cause: c_uint) -> Result<c_uint, nvmlReturn_t> {
    let fault = state
        .config
        .fault(i)
        .filter(|f| f.retires_pages())
        .ok_or(ERROR_NOT_SUPPORTED)?;
    match cause {
        RETIRED_FOR_SINGLE_BIT => Ok(fault.retired_pages_sbe.unwrap_or(0)),
        RETIRED_FOR_DOUBLE_BIT => Ok(fault.retired_pages_dbe.unwrap_or(0)),
        _ => Err(ERROR_INVALID_ARGUMENT),
    }
}

/// Remapped rows: (correctable, uncorrectable, pending, failure occurred).
fn remapped_rows(state: &State, i: usize) -> (c_uint, c_uint, c_uint, c_uint) {
    state.config.fault(i).map_or((0, 0, 0, 0), |f| {
        (
            f.remapped_rows_correctable,
            f.remapped_rows_uncorrectable,
            c_uint::from(f.remap_pending),
            c_uint::from(f.remap_failure),
        )
    })
}

/// One field of `nvmlDeviceGetFieldValues`.
enum Field {
    U32(c_uint),
    U64(c_ulonglong),
}

fn field(state: &State, i: usize, id: c_uint) -> Result<Field, nvmlReturn_t> {
    let (cor, unc, pending, failure) = remapped_rows(state, i);
    match id {
        NVML_FI_DEV_MEMORY_TEMP => memory_temperature(state, i).map(Field::U32),
        NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION => Ok(Field::U64(energy_mj(state, i))),
        NVML_FI_DEV_PCIE_REPLAY_COUNTER => Ok(Field::U64(u64::from(pcie_replays(state, i)))),
        NVML_FI_DEV_RETIRED_SBE => {
            retired_pages(state, i, RETIRED_FOR_SINGLE_BIT).map(|n| Field::U64(u64::from(n)))
        }
        NVML_FI_DEV_RETIRED_DBE => {
            retired_pages(state, i, RETIRED_FOR_DOUBLE_BIT).map(|n| Field::U64(u64::from(n)))
        }
        NVML_FI_DEV_REMAPPED_COR => Ok(Field::U32(cor)),
        NVML_FI_DEV_REMAPPED_UNC => Ok(Field::U32(unc)),
        NVML_FI_DEV_REMAPPED_PENDING => Ok(Field::U32(pending)),
        NVML_FI_DEV_REMAPPED_FAILURE => Ok(Field::U32(failure)),
        _ => Err(ERROR_NOT_SUPPORTED),
    }
}

/// Answers each requested field in place: its own status, type and value, as the real library does. The call
/// itself fails only when the GPU cannot be reached.
///
/// # Safety
/// `values` must be valid for reading and writing `count` elements.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetFieldValues(
    device: nvmlDevice_t,
    count: c_int,
    values: *mut nvmlFieldValue_t,
) -> nvmlReturn_t {
    let Ok(count) = usize::try_from(count) else {
        return ERROR_INVALID_ARGUMENT;
    };
    if values.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let state = lock();
    let i = match gpu(&state, device) {
        Ok(i) => i,
        Err(code) => return code,
    };
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    // SAFETY: non-null, and the caller passes `count` initialised elements.
    let values = unsafe { std::slice::from_raw_parts_mut(values, count) };
    for v in values {
        v.timestamp = now_us;
        v.latencyUsec = 0;
        match field(&state, i, v.fieldId) {
            Ok(Field::U32(x)) => {
                v.valueType = nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_INT;
                v.value = nvmlValue_t { uiVal: x };
                v.nvmlReturn = SUCCESS;
            }
            Ok(Field::U64(x)) => {
                v.valueType = nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG_LONG;
                v.value = nvmlValue_t { ullVal: x };
                v.nvmlReturn = SUCCESS;
            }
            Err(code) => v.nvmlReturn = code,
        }
    }
    SUCCESS
}

/// Runs `f` on a resolved GPU and writes its two answers.
///
/// # Safety
/// `a` and `b` must be null or valid for writes.
unsafe fn answer2<A, B>(
    device: nvmlDevice_t,
    a: *mut A,
    b: *mut B,
    f: impl FnOnce(&State, usize) -> Result<(A, B), nvmlReturn_t>,
) -> nvmlReturn_t {
    if a.is_null() || b.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let state = lock();
    match gpu(&state, device).and_then(|i| f(&state, i)) {
        Ok((x, y)) => {
            // SAFETY: non-null and valid for writes per this function's contract.
            unsafe {
                a.write(x);
                b.write(y);
            }
            SUCCESS
        }
        Err(code) => code,
    }
}

/// # Safety
/// `util` and `period_us` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetEncoderUtilization(
    device: nvmlDevice_t,
    util: *mut c_uint,
    period_us: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe {
        answer2(device, util, period_us, |state, i| {
            Ok((state.gpus()[i].encoder_util, CODEC_SAMPLING_PERIOD_US))
        })
    }
}

/// # Safety
/// `util` and `period_us` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetDecoderUtilization(
    device: nvmlDevice_t,
    util: *mut c_uint,
    period_us: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe {
        answer2(device, util, period_us, |state, i| {
            Ok((state.gpus()[i].decoder_util, CODEC_SAMPLING_PERIOD_US))
        })
    }
}

/// The fault file's bitmask, else "idle" on an idle GPU and no reason on a busy one.
///
/// # Safety
/// `reasons` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksThrottleReasons(
    device: nvmlDevice_t,
    reasons: *mut c_ulonglong,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe {
        answer(device, reasons, |state, i| {
            let idle = if gpu_util(i) == 0 {
                THROTTLE_GPU_IDLE
            } else {
                0
            };
            Ok(state
                .config
                .fault(i)
                .and_then(|f| f.throttle_reasons)
                .unwrap_or(idle))
        })
    }
}

/// # Safety
/// `value` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPcieReplayCounter(
    device: nvmlDevice_t,
    value: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe { answer(device, value, |state, i| Ok(pcie_replays(state, i))) }
}

/// Shared by both versions: `*count` is the room in the buffers on entry and the number of pages on return;
/// too little room (a size query passes 0) answers `NVML_ERROR_INSUFFICIENT_SIZE`.
///
/// # Safety
/// `count` must be valid for reads and writes; `addresses` (and `timestamps`, unless null) valid for writing
/// `*count` elements.
unsafe fn retired_page_list(
    device: nvmlDevice_t,
    cause: c_uint,
    count: *mut c_uint,
    addresses: *mut c_ulonglong,
    timestamps: *mut c_ulonglong,
) -> nvmlReturn_t {
    if count.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let state = lock();
    let pages = match gpu(&state, device).and_then(|i| retired_pages(&state, i, cause)) {
        Ok(n) => n,
        Err(code) => return code,
    };
    // SAFETY: checked non-null; caller guarantees validity.
    let room = unsafe { count.read() };
    // SAFETY: as above.
    unsafe { count.write(pages) };
    if room < pages {
        return ERROR_INSUFFICIENT_SIZE;
    }
    if pages > 0 && addresses.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let retired_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .saturating_sub(86_400);
    for k in 0..pages as usize {
        // 2 MiB pages, double-bit retirements in a separate range so the two lists never overlap.
        let address = 0x1_0000_0000 + u64::from(cause) * 0x1000_0000 + k as u64 * 0x20_0000;
        // SAFETY: the caller's buffers hold `room >= pages` elements.
        unsafe {
            addresses.add(k).write(address);
            if !timestamps.is_null() {
                timestamps.add(k).write(retired_at + k as u64 * 60);
            }
        }
    }
    SUCCESS
}

/// # Safety
/// See [`retired_page_list`].
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPages(
    device: nvmlDevice_t,
    cause: c_uint,
    count: *mut c_uint,
    addresses: *mut c_ulonglong,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe { retired_page_list(device, cause, count, addresses, std::ptr::null_mut()) }
}

/// # Safety
/// See [`retired_page_list`].
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPages_v2(
    device: nvmlDevice_t,
    cause: c_uint,
    count: *mut c_uint,
    addresses: *mut c_ulonglong,
    timestamps: *mut c_ulonglong,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe { retired_page_list(device, cause, count, addresses, timestamps) }
}

/// # Safety
/// All four pointers must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetRemappedRows(
    device: nvmlDevice_t,
    correctable: *mut c_uint,
    uncorrectable: *mut c_uint,
    pending: *mut c_uint,
    failure: *mut c_uint,
) -> nvmlReturn_t {
    if correctable.is_null() || uncorrectable.is_null() || pending.is_null() || failure.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let state = lock();
    let (c, u, p, f) = match gpu(&state, device) {
        Ok(i) => remapped_rows(&state, i),
        Err(code) => return code,
    };
    // SAFETY: checked non-null; caller guarantees validity.
    unsafe {
        correctable.write(c);
        uncorrectable.write(u);
        pending.write(p);
        failure.write(f);
    }
    SUCCESS
}

//! The stand-in loaded as the NVML backend loads a driver's library: through
//! nvml-wrapper, by path. (One test: the library's state is per process.)

use nvml_wrapper::Nvml;

#[test]
fn nvml_wrapper_loads_the_stand_in_and_sets_a_limit() {
    let exe = std::env::current_exe().unwrap();
    let lib = exe.parent().unwrap().join("libgpulet_nvml_standin.so");
    let nvml = Nvml::builder().lib_path(lib.as_os_str()).init().unwrap();
    assert_eq!(nvml.device_count().unwrap(), 8);
    let mut dev = nvml.device_by_index(2).unwrap();
    assert_eq!(dev.name().unwrap(), "NVIDIA H100 80GB HBM3");
    assert_eq!(dev.pci_info().unwrap().bus_id, "00000000:1A:00.0");
    let c = dev.power_management_limit_constraints().unwrap();
    assert_eq!((c.min_limit, c.max_limit), (200_000, 700_000));
    dev.set_power_management_limit(450_000).unwrap();
    assert_eq!(dev.enforced_power_limit().unwrap(), 450_000);
    assert!(dev.set_power_management_limit(900_000).is_err(), "outside the constraints");
    assert!(nvml.device_by_index(8).is_err());
    assert!(dev.mig_mode().is_err(), "MIG is not simulated");
}

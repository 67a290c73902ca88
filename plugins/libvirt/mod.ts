/**
 * The libvirt plugin: `nbdkit-ts libvirt [connect=URI] domain=DOMAIN [disk=DISK]`.
 *
 * @module
 */
import libvirtPlugin from "./plugin.ts";

export { createLibvirtPlugin } from "./plugin.ts";
export default libvirtPlugin;

/* CRC-32 (IEEE 802.3, reflected 0xedb88320; the same as zlib.crc32), slicing by 8. */
#ifndef ULIB_DEV_CRC32_H
#define ULIB_DEV_CRC32_H

#include <stddef.h>
#include <stdint.h>

/* crc32(0, buf, n) for a fresh CRC; chain by passing the previous result. */
uint32_t crc32(uint32_t crc, const void *buf, size_t n);

#endif

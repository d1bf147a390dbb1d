// bench_c_boost.cpp -- Boost.Interprocess managed_shared_memory allocate+deallocate pairs, the
// peer of bench_c.c's shmalloc core pairs. Built by stress/bench_c.py only when the Boost
// headers are installed (Debian: libboost-dev):
//     c++ -O2 -std=c++17 -DNDEBUG stress/bench_c_boost.cpp -lpthread -lrt
//
//   bench_c_boost ITERS TRIALS SIZE...
// Creates a managed_shared_memory segment (its default allocator: rbtree_best_fit guarded by an
// interprocess mutex, i.e. a process-shared heap like shmalloc's), removes its name at once (the
// mapping stays valid, so nothing is left behind however the program ends), then times ITERS
// allocate/deallocate pairs per size, TRIALS times. Prints one JSON object with ns per pair.
#include <boost/interprocess/managed_shared_memory.hpp>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <string>
#include <unistd.h>
#include <vector>

namespace bip = boost::interprocess;

static uint64_t now_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return uint64_t(ts.tv_sec) * 1000000000u + uint64_t(ts.tv_nsec);
}

#define KEEP(p) __asm__ volatile("" : : "r"(p) : "memory")

static double time_pairs(bip::managed_shared_memory &seg, std::size_t size, long iters) {
    uint64_t t0 = now_ns();
    for (long i = 0; i < iters; i++) {
        void *p = seg.allocate(size);  // throws bad_alloc when full
        KEEP(p);
        seg.deallocate(p);
    }
    return double(now_ns() - t0) / double(iters);
}

int main(int argc, char **argv) {
    long iters = argc < 4 ? 0 : std::atol(argv[1]);
    int trials = argc < 4 ? 0 : std::atoi(argv[2]);
    if (iters < 1 || trials < 1) {
        std::fprintf(stderr, "usage: bench_c_boost ITERS TRIALS SIZE... (ITERS, TRIALS >= 1)\n");
        return 2;
    }
    std::vector<std::size_t> sizes;
    for (int i = 3; i < argc; i++) sizes.push_back(std::strtoull(argv[i], nullptr, 10));
    std::string name = "shmalloc-benchc-boost-" + std::to_string(getpid());
    try {
        bip::shared_memory_object::remove(name.c_str());
        bip::managed_shared_memory seg(bip::create_only, name.c_str(), 256u << 20);
        bip::shared_memory_object::remove(name.c_str());
        for (std::size_t s : sizes) time_pairs(seg, s, iters / 10 + 1);  // warm-up
        std::vector<std::vector<double>> res(sizes.size());
        for (int t = 0; t < trials; t++)
            for (std::size_t i = 0; i < sizes.size(); i++)
                res[i].push_back(time_pairs(seg, sizes[i], iters));
        std::printf("{\n  \"iters\": %ld,\n  \"trials\": %d,\n  \"sizes\": {\n", iters, trials);
        for (std::size_t i = 0; i < sizes.size(); i++) {
            std::printf("   \"%zu\": {\"boost\": [", sizes[i]);
            for (int t = 0; t < trials; t++) std::printf("%s%.3f", t ? ", " : "", res[i][t]);
            std::printf("]}%s\n", i + 1 < sizes.size() ? "," : "");
        }
        std::printf("  }\n}\n");
    } catch (const std::exception &e) {
        bip::shared_memory_object::remove(name.c_str());
        std::fprintf(stderr, "bench_c_boost: %s\n", e.what());
        return 1;
    }
    return 0;
}

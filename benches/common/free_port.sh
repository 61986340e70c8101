# Sourced by the benchmark scripts (bash).
# A loopback port free for both UDP and TCP right now (the window until bind is small), below the
# kernel's ephemeral range (32768 and up by default), so that no outgoing connection takes it.
free_port() {
    local port
    for _ in $(seq 1 200); do
        port=$((20000 + RANDOM % 12000))
        if [[ -z $(ss -Hlnu "sport = :$port") && -z $(ss -Hlnt "sport = :$port") ]]; then
            echo "$port"
            return 0
        fi
    done
    echo "no free loopback port found" >&2
    return 1
}

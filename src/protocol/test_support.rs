//! Test helpers shared by the tests that speak MQTT through `mqttbytes` (the codec's
//! differential tests, the connection core's unit tests, the simulation).

use mqttbytes::v5;

/// v5 CONNECT properties with only Session Expiry Interval and Receive Maximum set
/// (`mqttbytes` has no public constructor for them).
pub(crate) fn v5_connect_properties(
    expiry: Option<u32>,
    receive_maximum: Option<u16>,
) -> v5::ConnectProperties {
    v5::ConnectProperties {
        session_expiry_interval: expiry,
        receive_maximum,
        max_packet_size: None,
        topic_alias_max: None,
        request_response_info: None,
        request_problem_info: None,
        user_properties: Vec::new(),
        authentication_method: None,
        authentication_data: None,
    }
}

//! The OpenAPI document of the HTTP API, assembled from the handlers' annotations.

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{alerts, events, health, ingest, keys, sites, units, webhooks};
use crate::wire;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sensorwire HTTP API",
        description = "Reads for dashboards, admin endpoints, health. Errors are `ApiError`. \
                       Users authenticate with `Authorization: Bearer <JWT>`, devices with \
                       `X-API-Key` (or `Authorization: Bearer <key>`)."
    ),
    paths(
        health::healthz, health::readyz, health::metrics, ingest::ingest,
        sites::list, sites::get_one, sites::create, sites::remove,
        units::list, units::get_one, units::create, units::update, units::remove,
        units::latest, units::readings, alerts::list, alerts::export_csv, alerts::acknowledge,
        keys::create, keys::revoke, events::publish,
        webhooks::create, webhooks::list, webhooks::remove, webhooks::deliveries,
    ),
    components(schemas(
        wire::SensorReading, wire::Site, wire::Unit, wire::UnitStatus, wire::Alert,
        wire::AlertType, wire::AlertStatus, wire::Severity, wire::ApiError, wire::FieldError,
        wire::CreateSite, wire::CreateUnit, wire::UpdateUnit, wire::CreateApiKey,
        wire::ApiKeyCreated, wire::KeyScope,
        wire::CreateWebhook, wire::WebhookCreated, wire::Webhook, wire::WebhookDelivery,
        wire::WebhookPayload,
        wire::IngestRequest, wire::IngestReading, wire::IngestResponse,
        wire::ReadingsBatch, wire::AlertTriggered, wire::AlertResolved, wire::AlertAcknowledged,
        wire::AcknowledgeAlert, wire::UnitStatusChanged,
        wire::SyncComplete, wire::SyncRequest, wire::MissedEvent, wire::SyncAck,
        wire::PublishRequest, wire::PublishResponse,
        wire::WsChannel, wire::WsClientMessage, wire::WsServerMessage, wire::TelemetryData,
        wire::TelemetryMetrics,
        wire::SubscribeAck, wire::SubscribeError, wire::RefreshAck, wire::ErrorEvent, wire::AuthExpired,
    )),
    modifiers(&Security),
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "apiKey",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}
